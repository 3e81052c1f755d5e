"""`benchmarks/gpu_check.py` (`make gpu-check`) without a GPU: its dry run, its problems, and how its parts are run
(isolated, within their budget) on stand-in commands. Nothing is trained here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.fixture
def no_gpu(monkeypatch):
    """The machine has no GPU, whatever this one has: the dry run (nothing is trained)."""
    monkeypatch.setattr(gpu_check, "gpu_description", lambda: None)


def test_dry_run_without_gpu_checks_everything_and_exits_0(no_gpu, tmp_path, capsys):
    out, work = tmp_path / "gpu_check.json", tmp_path / "work"
    assert gpu_check.main(["--output", str(out), "--work-dir", str(work)]) == 0
    text = capsys.readouterr().out
    assert "[gpu-check] GPU: none visible to torch; dry run: checks only, nothing is trained" in text
    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["device"] is None
    checks = {c["check"]: c for c in data["checks"]}
    for name in (
        "model smollm2",
        "ZeRO-3 config",
        "accelerate launch line",
        "compare command line",
        "options of bench_online_var smollm2",
    ):
        assert checks[name]["ok"], checks[name]
    for method in gpu_check.METHODS:  # every quickstart recipe, and the recipe the launch reads, pass check-recipe
        assert checks[f"recipe {method}"] == {
            "check": f"recipe {method}",
            "ok": True,
            "detail": f"{gpu_check.shown_path(gpu_check.RECIPES)}/{method}.yaml and its launch overrides pass "
            "check-recipe",
        }
    assert f"[gpu-check] dry run: {len(checks)} of {len(checks)} checks passed" in text

    parts = {p["name"]: p for p in data["parts"]}
    assert list(parts) == [
        "bench_var smollm2", "bench_vcb smollm2", "bench_ra_dpo smollm2", "bench_online_var smollm2",
        "zero3 var", "zero3 vcb", "zero3 reward_augmented_dpo", "zero3 online_var", "compare lora",
    ]  # fmt: skip
    assert all(parts[n]["status"] == "ready" for n in list(parts)[:-1])
    assert parts["zero3 vcb"]["command"] == (
        f"python -m accelerate.commands.launch --config_file {gpu_check.zero3_config_path()} --num_processes 1 "
        "--num_machines 1 --mixed_precision bf16 --dynamo_backend no -m trl_rewardweighted.scripts.vcb "
        f"--config {work}/zero3_vcb.yaml"
    )
    assert parts["bench_online_var smollm2"]["command"].startswith(
        "python benchmarks/bench_online_var.py --rounds 3 --steps-per-round 4 --memory-steps 2 --model smollm2 --bf16"
    )
    # The launch recipe: the quickstart recipe with bf16, 2 steps, the model and an output folder of its own.
    import yaml

    recipe = yaml.safe_load((work / "zero3_online_var.yaml").read_text())
    assert (recipe["bf16"], recipe["max_steps"], recipe["model_name_or_path"]) == (True, 2, "smollm2")
    assert recipe["output_dir"] == str(work / "zero3_online_var") and recipe["num_generations"] == 4
    assert Path(recipe["dataset_name"]).is_absolute() and Path(recipe["dataset_name"]).is_file()  # runs from anywhere
    # The compare: skipped while `trl-rw compare` has no --config, else run with the LoRA block.
    if gpu_check.compare_supports_config():
        assert parts["compare lora"]["status"] == "ready"
        assert parts["compare lora"]["command"].endswith(f"--config {work}/compare_lora.yaml")
    else:
        assert (parts["compare lora"]["status"], parts["compare lora"]["detail"]) == (
            "skipped",
            "compare has no --config",
        )
    lora = yaml.safe_load((work / "compare_lora.yaml").read_text())
    assert (lora["preset"], lora["use_peft"], lora["lora_target_modules"]) == ("gpu-bf16", True, ["all-linear"])


def test_dry_run_checks_the_compare_training_block(no_gpu, tmp_path, monkeypatch, capsys):
    if not gpu_check.compare_supports_config():
        pytest.skip("trl-rw compare has no --config in this checkout")
    monkeypatch.setitem(gpu_check.COMPARE_LORA_CONFIG, "lora_rr", 8)
    assert gpu_check.main(["--only", "compare", "--work-dir", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert (
        f"NO  compare LoRA block: --config {tmp_path}/compare_lora.yaml: unknown key `lora_rr`: not a field of the "
        "methods' configs or of ModelConfig."
    ) in text
    assert "Did you mean `lora_r`?" in text


def test_dry_run_problems_exit_1_with_the_reason(no_gpu, tmp_path, monkeypatch, capsys):
    # A --model-dir that is not there, and a quickstart recipe with a key TRL 1.16 renamed.
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "var.yaml").write_text("max_seq_length: 512\nbeta: 0.5\ndataset_name: rows.jsonl\n")
    monkeypatch.setattr(gpu_check, "RECIPES", recipes)
    missing = tmp_path / "nope"
    argv = ["--model-dir", str(missing), "--only", "zero3 var,zero3 vcb", "--work-dir", str(tmp_path / "w")]
    assert gpu_check.main(argv) == 1
    text = capsys.readouterr().out
    assert f"NO  model --model-dir: --model-dir {missing}: no such folder (give a local model folder" in text
    assert "NO  recipe var: " in text and "max_seq_length" in text
    assert f"{recipes}/var.yaml: dataset_name rows.jsonl: no such file next to the recipe" in text
    assert "NO  recipe vcb: " in text and "no such recipe" in text
    assert "[gpu-check] dry run: 4 of 7 checks passed; problems: " in text

    with pytest.raises(SystemExit):
        gpu_check.main(["--budget-s", "0"])
    assert "--budget-s must be > 0" in capsys.readouterr().err


def _part(name, code, budget=30.0, kind="other"):
    return gpu_check.Part(name, kind, [sys.executable, "-c", code], budget)


def test_parts_are_isolated_and_kept_within_their_budget(tmp_path):
    rows = [{"name": "VAR", "group": "g", "baseline": "SFT", "median_step_ms": 10.0, "time_ratio": 1.02}]
    bench = _part("bench ok", f"import json; json.dump({{'rows': {rows!r}, 'goals': {{}}}}, open({str(tmp_path / 'b.json')!r}, 'w'))", kind="bench")  # fmt: skip
    bench.output = str(tmp_path / "b.json")
    parts = [
        _part("fails", "import sys; print('boom'); sys.exit(3)"),
        _part("hangs", "import subprocess, sys; subprocess.run(['sleep', '30'])", budget=1.0),
        bench,
        gpu_check.Part("never", "other", [str(tmp_path / "no-such-program")], 30.0),
    ]
    gpu_check.run_parts(parts, tmp_path, budget_s=120)
    assert [(p.status, p.returncode) for p in parts] == [("failed", 3), ("timed out", None), ("ok", 0), ("failed", 1)]
    assert parts[0].detail == "exit code 3: boom" and parts[0].tail == ["boom"]
    assert parts[1].seconds < 10  # killed at its own budget (1 s), its child too
    assert parts[2].rows == rows
    assert parts[3].detail.startswith("exit code 1: FileNotFoundError")
    table = gpu_check.table(parts)
    assert "bench ok  ok" in table and "VAR" in table and "1.020" in table

    # Out of time: a part that no longer fits in what is left of the budget is skipped, said so.
    ticks = iter(range(0, 1000, 10))
    late = [_part("first", "pass"), _part("second", "pass")]
    gpu_check.run_parts(late, tmp_path, budget_s=45, clock=lambda: next(ticks))
    assert [p.status for p in late] == ["ok", "skipped"]
    assert late[1].detail == "out of time: the 45 s budget was spent"


def test_bench_outcome_keeps_what_else_the_benchmark_measured(tmp_path):
    """A benchmark's values outside the rows schema (bench_online_var's `log_q_agreement`) reach the result and the
    part's detail line."""
    data = {
        "benchmark": "bench_online_var",
        "settings": {"device": "GPU", "memory": "CUDA", "bf16": True},
        "rows": [],
        "log_q_agreement": {"tokens": 512, "per_sequence_mean_abs": 0.35012, "weight_max_abs_change": 0.1337},
    }
    (tmp_path / "b.json").write_text(json.dumps(data))
    part = gpu_check.Part("bench_online_var smollm2", "bench", ["x"], 60.0, output=str(tmp_path / "b.json"))
    gpu_check.read_outcome(part, 0, [])
    assert part.status == "ok" and part.result["log_q_agreement"] == data["log_q_agreement"]
    assert part.result["device"] == "GPU" and "bf16" not in part.result
    assert part.detail == (
        "log_q_agreement.tokens=512, log_q_agreement.per_sequence_mean_abs=0.3501, "
        "log_q_agreement.weight_max_abs_change=0.1337"
    )


def test_zero3_outcome_reads_the_logged_losses_and_the_saved_model(tmp_path):
    part = gpu_check.Part("zero3 var", "zero3", ["x"], 60.0, output=str(tmp_path))
    part.seconds = 12.0
    tail = ["{'loss': '2.431', 'grad_norm': '5.1', 'epoch': '0.5'}", "{'loss': 2.402, 'epoch': 1.0}", "done"]
    gpu_check.read_outcome(part, 0, tail)
    assert (part.status, part.result) == ("failed", {"saved": False, "losses": [2.431, 2.402]})
    (tmp_path / "model.safetensors").write_bytes(b"")
    gpu_check.read_outcome(part, 0, tail[-1:], log="\n".join(tail))  # the whole log, not only its last lines
    assert part.status == "ok" and part.detail == "2 logged step(s), losses 2.431, 2.402; model saved: True"


def test_from_json_shows_an_earlier_run_and_records_its_section(no_gpu, tmp_path, monkeypatch, capsys):
    """A run brought back from a GPU machine: its table, and with --record its section of RESULTS.md (not for a dry
    run)."""
    import run_all

    saved = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--only", "bench_var", "--output", str(saved)]) == 0
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## `trl-rw compare` phase times\n\nx\n")
    monkeypatch.setattr(run_all, "RESULTS", results)
    capsys.readouterr()
    assert gpu_check.main(["--from-json", str(saved), "--record"]) == 0
    assert "a dry run has nothing to record; RESULTS.md is unchanged" in capsys.readouterr().out
    assert "GPU check" not in results.read_text()

    data = json.loads(saved.read_text())
    row = {"name": "VAR", "group": "VAR vs SFTTrainer", "baseline": "SFT", "median_step_ms": 9.5, "time_ratio": 1.04}
    data["dry_run"], data["device"] = False, "NVIDIA H100 80GB HBM3, 80 GiB (1 visible)"
    data["parts"][0].update(status="ok", seconds=30.0, rows=[row])
    saved.write_text(json.dumps(data))
    assert gpu_check.main(["--from-json", str(saved), "--record"]) == 0
    out = capsys.readouterr().out
    assert "bench_var smollm2  ok      30/90  VAR" in out and "1.040" in out
    text = results.read_text()
    assert text.index("## GPU check") < text.index("## `trl-rw compare`") and "| VAR | SFT | 9.5 | 1.040× |" in text


def test_gpu_check_sh_runs_the_dry_run_and_reports_the_environment(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(["bash", str(script), "--only", "bench_var"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "== GPU" in res.stdout and "[gpu-check] packages: python " in res.stdout
    assert "[gpu-check] dry run: " in res.stdout
    assert json.loads((tmp_path / "gpu_check.json").read_text())["dry_run"] is True
    assert (tmp_path / "gpu_check.log").read_text() == res.stdout.split(
        "== benchmarks/gpu_check.py --only bench_var\n"
    )[1]
