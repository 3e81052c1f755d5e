"""`benchmarks/run_all.py`'s RESULTS.md writer on canned results: no benchmark runs here."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run_all  # noqa: E402


def _var_json():
    return {
        "benchmark": "bench_var",
        "goal": "VAR <= 1.10x SFTTrainer's step time and <= 1.05x its peak memory",
        "goals": {"VAR vs SFTTrainer": {"time_ratio": 1.10, "mem_ratio": 1.05}},
        "settings": {"model": "tiny", "batch_size": 8, "bf16": False},
        "rows": [
            {"name": "SFTTrainer (TRL)", "group": "VAR vs SFTTrainer", "baseline": None, "median_step_ms": 50.33,
             "time_ratio": 1.0, "tokens_per_s": 15133, "peak_mib": 580.5, "mem_ratio": 1.0},
            {"name": "VAR, precomputed reference", "group": "VAR vs SFTTrainer", "baseline": "SFTTrainer (TRL)",
             "median_step_ms": 50.28, "time_ratio": 0.99904, "tokens_per_s": 15147, "peak_mib": 579.7,
             "mem_ratio": 0.9984},
            {"name": "VAR, ref_weighting=False", "group": "VAR vs SFTTrainer", "baseline": "SFTTrainer (TRL)",
             "median_step_ms": 62.39, "time_ratio": 1.2396, "tokens_per_s": 12207, "peak_mib": 582.1,
             "mem_ratio": 1.0027},
        ],
    }  # fmt: skip


def _run(load_mean=1.1):
    return {
        "date": "2026-01-02 03:04 UTC",
        "command": "python benchmarks/run_all.py",
        "machine": {
            "cpu": "Test CPU 9000",
            "cores": 2,
            "usable_cores": 2,
            "ram_gib": 7.8,
            "gpu": None,
            "os": "Linux-test",
            "omp_num_threads": "1",
            "load": {"mean": load_mean, "max": 2.5, "interval_s": 5.0},
        },
        "versions": {"python": "3.11.7", "torch": "2.13.0", "trl": "1.16.0", "deepspeed": "0.19.8"},
        "git": "abc1234 (2026-01-01) a commit",
        "wall_s": 754.0,
        "benchmarks": {
            "bench_var": {"command": "python benchmarks/bench_var.py --rounds 10", "returncode": 0, "wall_s": 61.0,
                          "load": {"mean": 1.0, "max": 1.2, "interval_s": 5.0}, "json": _var_json()},
            "bench_vcb": {"command": "python benchmarks/bench_vcb.py", "returncode": 1, "wall_s": 3.0, "json": None,
                          "error": "exit code 1, no readable JSON (FileNotFoundError)",
                          "tail": ["Traceback (most recent call last):", "RuntimeError: boom"]},
            "bench_sampling": None,
            "bench_new": {"command": "python benchmarks/bench_new.py", "returncode": 0, "wall_s": 5.0,
                          "json": {"throughput": {"prompts_per_s": 12.5, "ok": True}, "label": "a|b"}},
        },
        "compare": {
            "source": "run",
            "command": "trl-rw compare --steps 3 --no-progress",
            "returncode": 0,
            "wall_s": 240.0,
            "timings": {"sample_and_score": 20.0, "train_sft": 30.0, "train_dpo": 36.0, "evaluate": 50.0,
                        "total": 150.0},
            "budgets": {"sft": {"steps": 3, "batch_size": 8}, "dpo": {"steps": 3, "batch_size": 4}},
        },
    }  # fmt: skip


def _table_row(text: str, first_cell: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert rows, f"no table row starting with {first_cell!r}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_results_header_and_benchmark_tables():
    text = run_all.render_results(_run())
    assert text.startswith("# Benchmark results\n")
    # Machine header: CPU, cores, RAM, versions, commit, the command and how it was produced.
    assert "| CPU | Test CPU 9000, 2 cores (2 usable), 7.8 GiB RAM |" in text
    assert "| GPU | none |" in text
    assert "python 3.11.7, torch 2.13.0, trl 1.16.0, deepspeed 0.19.8" in text
    assert "| git commit | abc1234 (2026-01-01) a commit |" in text
    assert "| wall time | 12 min 34 s |" in text
    assert "[HISTORY.md](HISTORY.md)" in text and "±10 %" in text and "make bench" in text
    assert "The host was busy" not in text
    # VAR table: ratios formatted, ms / MiB / tokens/s, and the goal verdict per row.
    row = _table_row(text, "VAR, precomputed reference")
    assert row == ["VAR, precomputed reference", "SFTTrainer (TRL)", "50.3", "0.999×", "15,147", "580", "0.998×",
                   "time ≤ 1.10×: yes; memory ≤ 1.05×: yes"]  # fmt: skip
    assert _table_row(text, "VAR, ref_weighting=False")[-1] == "time ≤ 1.10×: no; memory ≤ 1.05×: yes"
    assert _table_row(text, "SFTTrainer (TRL)")[1:4] == ["baseline", "50.3", "1.000×"]
    header = _table_row(text, "trainer")
    assert header[:4] == ["trainer", "vs", "step (ms)", "step-time ratio"] and "padded" not in header
    assert "Command: `python benchmarks/bench_var.py --rounds 10` (plus `--json PATH`), wall time 1 min 01 s" in text
    # Summary: one line per compared trainer, the failed benchmark and the absent one.
    assert "| `bench_var` | VAR, ref_weighting=False | SFTTrainer (TRL) | 1.240× | 1.003× |" in text
    assert "| `bench_vcb` | not measured |" in text
    assert "| `bench_sampling` | not run |" in text


def test_results_missing_failed_and_unknown_benchmarks():
    text = run_all.render_results(_run())
    # Absent script: said so, not an error.
    assert "Not run: `benchmarks/bench_sampling.py` was not present" in text
    # Failed run: marked, with the end of its output.
    vcb = text[text.index("`benchmarks/bench_vcb.py`") :]
    assert "**Not measured**: exit code 1, no readable JSON" in vcb
    assert "RuntimeError: boom" in vcb.split("## ")[0]
    # Unknown JSON: a key/value table, nested keys dotted, pipes escaped.
    assert "| `throughput.prompts_per_s` | 12.5 |" in text
    assert "| `throughput.ok` | yes |" in text
    assert "| `label` | a\\|b |" in text
    assert "No GPU was available for this run" in text
    # A script without `--json` is not run, and said so.
    run = _run()
    run["benchmarks"]["bench_sampling"] = {"command": "python benchmarks/bench_sampling.py", "json": None,
                                           "error": "not run: the script has no `--json PATH` option yet"}  # fmt: skip
    text = run_all.render_results(run)
    assert "**Not measured**: not run: the script has no `--json PATH` option yet." in text
    assert "| `bench_sampling` | not measured |" in text


def test_results_compare_phases_and_busy_host():
    text = run_all.render_results(_run(load_mean=2.4))
    assert "The host was busy" in text and "mean load 2.4 on 2 cores" in text
    compare = text[text.index("## `trl-rw compare` phase times") :]
    assert "Command: `trl-rw compare --steps 3 --no-progress`" in compare
    assert _table_row(compare, "sampling + scoring")[1] == "20.0"
    assert _table_row(compare, "training: sft")[1:4] == ["30.0", "3", "10.0"]
    assert _table_row(compare, "training: dpo")[1:5] == ["36.0", "3", "12.0", "4 pairs"]
    assert _table_row(compare, "training, all methods")[1] == "66.0"
    assert _table_row(compare, "evaluation (every model and the reference)")[1] == "50.0"
    assert _table_row(compare, "total (also model loading and saving)")[1] == "150.0"

    run = _run()
    run["compare"] = {"source": "skipped"}
    assert "Skipped (`--skip-compare`)." in run_all.render_results(run)
    run["compare"] = {"source": "run", "command": "trl-rw compare", "returncode": 2, "tail": ["no model"]}
    assert "**Not measured**: exit code 2, no compare.json" in run_all.render_results(run)


def test_run_all_renders_a_saved_run(tmp_path):
    raw, out = tmp_path / "raw.json", tmp_path / "RESULTS.md"
    raw.write_text(json.dumps(_run()))
    assert run_all.main(["--from-raw", str(raw), "--output", str(out)]) == 0
    assert out.read_text() == run_all.render_results(_run())
    # --note is applied when re-rendering too (added under the header), not ignored.
    assert run_all.main(["--from-raw", str(raw), "--output", str(out), "--note", "Quiet host."]) == 0
    assert out.read_text() == run_all.render_results({**_run(), "note": "Quiet host."})
    assert "\nQuiet host.\n" in out.read_text()
    with pytest.raises(SystemExit, match="unknown"):
        run_all.benchmark_names("bench_var,bench_nope")


def test_benchmark_arguments_default_quick_gpu_and_override():
    from argparse import Namespace

    opts = Namespace(quick=False, args=None, gpu_model="/models/qwen2.5-0.5b")
    assert run_all.benchmark_args("bench_var", opts, gpu=False) == ["--rounds", "10"]
    # GPU rows: the GPU model, bf16, and per-benchmark GPU settings (UltraFeedback's lengths for padding-free).
    gpu_var = ["--rounds", "10", "--model", opts.gpu_model, "--bf16"]
    assert run_all.benchmark_args("bench_var", opts, gpu=True) == gpu_var
    assert run_all.benchmark_args("bench_padding_free", opts, gpu=True) == [
        "--model", opts.gpu_model, "--bf16", "--length-scale", "1", "--max-length", "2048"
    ]  # fmt: skip
    assert "--skip-relabel" in run_all.benchmark_args("bench_ra_dpo", opts, gpu=True)
    quick = Namespace(quick=True, args=["bench_vcb=--rounds 7 --no-memory"], gpu_model="smollm2")
    assert run_all.benchmark_args("bench_vcb", quick, gpu=False) == ["--rounds", "7", "--no-memory"]
    assert run_all.benchmark_args("bench_var", quick, gpu=False)[:2] == ["--rounds", "2"]


def test_child_json_reads_an_indented_value_after_library_output():
    """The memory children print `dumps_json(...)` (indented): the parent reads the whole value, not its last line
    (which is `}`), whatever the libraries printed before it."""
    from _common import child_json

    out = '[WARNING] Setting accelerator to CPU.\n{\n "peak_mib": 561.5,\n "train_mib": null\n}\n'
    assert child_json(out) == {"peak_mib": 561.5, "train_mib": None}
    assert child_json('noise\n{"peak_mib": 2.0}') == {"peak_mib": 2.0}
    with pytest.raises(ValueError, match="no JSON value"):
        child_json("Traceback (most recent call last):\n  boom\n")


def test_online_var_pair_rows_and_run_all_arguments():
    """bench_online_var's JSON: online VAR against GRPO beta=0 and beta=0.04, in the schema run_all renders, with its
    goal (<= 1.05x) in the summary; run_all runs it in the CPU and GPU passes."""
    from argparse import Namespace

    import bench_online_var

    kinds = ("grpo", "grpo_kl", "online_var", "online_var_policy")
    opts = Namespace(model="tiny", beta=1.0, grpo_kl_beta=0.04, batch_size=8, kinds=kinds, online_var_log_q="generate")
    times = {"grpo": 0.100, "grpo_kl": 0.110, "online_var": 0.104, "online_var_policy": 0.121}
    tokens = {"grpo": 5000.4, "grpo_kl": 4545.0, "online_var": None, "online_var_policy": 4000.0}
    memory = {k: {"peak_mib": v, "train_mib": None} for k, v in (("grpo", 500.0), ("grpo_kl", 520.0),
                                                                   ("online_var", 525.0))}  # fmt: skip
    agreement = {"sequences": 8, "tokens": 240, "per_sequence_mean_abs": 0.35, "weight_max_abs_change": 0.13}
    data = bench_online_var.json_results(opts, "CPU (1 threads)", times, tokens, memory, True, agreement)
    assert data["benchmark"] == "bench_online_var" and data["settings"]["same_generations"] is True
    assert data["log_q_agreement"] == agreement
    assert data["settings"]["online_var_log_q"] == "generate"
    auto, policy = (
        "OnlineVARTrainer, beta=1, log_q_from=auto (generate)",
        "OnlineVARTrainer, beta=1, log_q_from=policy",
    )
    assert [(r["name"], r["baseline"], r["time_ratio"], r.get("mem_ratio")) for r in data["rows"]] == [
        ("GRPOTrainer (TRL), beta=0", None, 1.0, 1.0),
        (auto, "GRPOTrainer (TRL), beta=0", 1.04, 1.05),
        (policy, "GRPOTrainer (TRL), beta=0", 1.21, None),
        ("GRPOTrainer (TRL), beta=0.04", None, 1.0, 1.0),
        (auto, "GRPOTrainer (TRL), beta=0.04", 0.9455, 1.0096),
        (policy, "GRPOTrainer (TRL), beta=0.04", 1.1, None),
    ]
    assert data["rows"][0]["tokens_per_s"] == 5000 and data["rows"][1]["tokens_per_s"] is None
    run = _run()
    run["benchmarks"]["bench_online_var"] = {
        "command": "python benchmarks/bench_online_var.py",
        "json": data,
        "returncode": 0,
    }
    text = run_all.render_results(run)
    assert (
        f"| `bench_online_var` | {auto} | GRPOTrainer (TRL), beta=0 | 1.040× | 1.050× | "
        "step time ≤ 1.05×, peak memory ≤ 1.05× | time ≤ 1.05×: yes; memory ≤ 1.05×: yes |"
    ) in text
    assert "## Online VAR vs GRPOTrainer — `benchmarks/bench_online_var.py`" in text
    assert "per_sequence_mean_abs" in text and "weight_max_abs_change" in text

    gpu = Namespace(quick=False, args=None, gpu_model="smollm2")
    assert "bench_online_var" in run_all.benchmark_names(None)
    assert run_all.benchmark_args("bench_online_var", gpu, gpu=False) == []
    assert run_all.benchmark_args("bench_online_var", gpu, gpu=True) == ["--model", "smollm2", "--bf16"]


def _gpu_check():
    rows = [
        {"name": "SFTTrainer (TRL)", "group": "VAR vs SFTTrainer", "baseline": None, "median_step_ms": 21.5,
         "time_ratio": 1.0, "tokens_per_s": 190000, "peak_mib": 2100.0, "mem_ratio": 1.0},
        {"name": "VAR, precomputed reference", "group": "VAR vs SFTTrainer", "baseline": "SFTTrainer (TRL)",
         "median_step_ms": 22.0, "time_ratio": 1.0233, "tokens_per_s": 185700, "peak_mib": 2110.0, "mem_ratio": 1.0048},
    ]  # fmt: skip
    part = {"name": "bench_var smollm2", "kind": "bench", "status": "ok", "seconds": 41.2, "budget_s": 90,
            "model": "/cache/SmolLM2-135M-Instruct", "detail": "", "rows": rows,
            "goals": {"VAR vs SFTTrainer": {"time_ratio": 1.10, "mem_ratio": 1.05}}}  # fmt: skip
    return {
        "benchmark": "gpu_check", "date": "2026-02-03 04:05 UTC", "command": "python benchmarks/gpu_check.py --record",
        "device": "NVIDIA H100 80GB HBM3, 80 GiB (1 visible)", "dry_run": False, "budget_s": 470, "wall_s": 402.0,
        "versions": {"torch": "2.13.0 (CUDA 12.8)", "deepspeed": "0.19.8"}, "git": "abc1234 (2026-02-01) x",
        "checks": [], "counts": {"ok": 2, "failed": 1, "timed out": 0, "skipped": 1, "ready": 0},
        "parts": [
            part,
            {"name": "zero3 vcb", "kind": "zero3", "status": "ok", "seconds": 38.0, "budget_s": 75, "rows": [],
             "detail": "2 logged step(s), losses 0.69, 0.68; model saved: True"},
            {"name": "zero3 online_var", "kind": "zero3", "status": "failed", "seconds": 20.5, "budget_s": 75,
             "rows": [], "detail": "exit code 1: ImportError: vaderSentiment | x"},
            {"name": "compare lora", "kind": "compare", "status": "skipped", "seconds": None, "budget_s": 150,
             "rows": [], "detail": "compare has no --config"},
        ],
    }  # fmt: skip


def test_results_gpu_check_section():
    text = run_all.render_results(dict(_run(), gpu_check=_gpu_check()))
    section = text[text.index("## GPU check — `make gpu-check`") : text.index("## `trl-rw compare` phase times")]
    assert "Run on NVIDIA H100 80GB HBM3, 80 GiB (1 visible), 2026-02-03 04:05 UTC" in section
    assert "wall time 6 min 42 s (budget 7 min 50 s)" in section and "torch 2.13.0 (CUDA 12.8)" in section
    # The benchmark rows, one table per model and group, with the goal verdicts.
    assert "**SmolLM2-135M-Instruct: VAR vs SFTTrainer** (goal: step time ≤ 1.10×, peak memory ≤ 1.05×)" in section
    assert _table_row(section, "VAR, precomputed reference") == [
        "VAR, precomputed reference", "SFTTrainer (TRL)", "22.0", "1.023×", "185,700", "2,110", "1.005×",
        "time ≤ 1.10×: yes; memory ≤ 1.05×: yes",
    ]  # fmt: skip
    # Every part, with its status, time within its budget and detail (pipes escaped).
    assert _table_row(section, "zero3 vcb") == ["zero3 vcb", "ok", "38 (75)", "2 logged step(s), losses 0.69, 0.68; "
                                                "model saved: True"]  # fmt: skip
    assert "| zero3 online_var | failed | 20 (75) | exit code 1: ImportError: vaderSentiment \\| x |" in section
    assert _table_row(section, "compare lora")[1:] == ["skipped", "–", "compare has no --config"]
    assert "2 ok, 1 failed, 0 timed out, 1 skipped, 0 ready." in section
    # None recorded: how to get one. A dry run: its checks.
    assert "No GPU check recorded: `make gpu-check` on a machine with a GPU" in run_all.render_results(_run())
    dry = dict(_gpu_check(), dry_run=True, checks=[{"check": "recipe var", "ok": True, "detail": "passes"}])
    assert "| recipe var | yes | passes |" in "\n".join(run_all.render_gpu_check(dry))


def test_record_gpu_check_splices_the_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(run_all.render_results(_run()))
    before = results.read_text()
    run_all.record_gpu_check(_gpu_check(), results)
    after = results.read_text()
    assert "No GPU check recorded" not in after and "| zero3 vcb | ok | 38 (75) |" in after
    # Only that section changed: the rest of the file is as it was, the compare section still follows it.
    head, tail = before.split("## GPU check — `make gpu-check`")
    assert after.startswith(head) and after.endswith("## `trl-rw compare`" + tail.split("## `trl-rw compare`")[1])
    run_all.record_gpu_check(_gpu_check(), results)  # again: replaced, not added
    assert results.read_text() == after and after.count("## GPU check") == 1
    # A file without the section (an older RESULTS.md): inserted before the compare section.
    old = tmp_path / "OLD.md"
    old.write_text("# Benchmark results\n\n## Summary\n\nx\n\n## `trl-rw compare` phase times\n\ny\n")
    run_all.record_gpu_check(_gpu_check(), old)
    text = old.read_text()
    assert text.index("## Summary") < text.index("## GPU check") < text.index("## `trl-rw compare`")
    assert text.endswith("## `trl-rw compare` phase times\n\ny\n")
