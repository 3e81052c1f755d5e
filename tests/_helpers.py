"""Helpers shared by the tests (import as `from tests._helpers import ...`)."""


def cpu_args(**overrides):
    """Training-argument overrides every CPU test needs (TRL's base config defaults to bf16 + checkpointing)."""
    base = dict(
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    base.update(overrides)
    return base


def make_grad_capture():
    """A TrainerCallback that keeps the flattened gradient of the first optimizer step (after DDP's all-reduce, before
    the update); parameters without a gradient contribute zeros so vectors from different runs line up."""
    import torch
    from transformers import TrainerCallback

    class GradCapture(TrainerCallback):
        def __init__(self):
            self.grad = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.grad is None:
                self.grad = torch.cat(
                    [
                        p.grad.detach().flatten().float().cpu() if p.grad is not None else torch.zeros(p.numel())
                        for p in model.parameters()
                        if p.requires_grad
                    ]
                )

    return GradCapture()


def first_loss(trainer):
    """The loss of the first logged training step."""
    return next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)


def train_logs(trainer):
    """The logged training steps (entries with a `loss`)."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def snapshot(model):
    """A CPU copy of every named parameter."""
    return {n: p.detach().clone().cpu() for n, p in model.named_parameters()}


def changed_names(model, before):
    """Names of the parameters that differ from a `snapshot`."""
    import torch

    return {n for n, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[n])}


def kill_process_tree(pid):
    """SIGKILL the process `pid`, every process it started, and their process groups.

    torch's launcher (torchrun, accelerate's elastic agent) starts each rank in its own session, so killing the
    launcher's process group leaves the ranks running (and holding its output pipes). The tree is frozen first (SIGSTOP),
    so no process forks or exits while it is listed, then each group is killed. The caller's own group is never touched.
    """
    import os
    import signal

    import psutil  # a dependency of accelerate and TRL

    own_group = os.getpgid(0)
    try:
        root = psutil.Process(pid)
        processes = [root]
        while True:  # list, freeze, and list again until no new process appears
            for process in processes:
                try:
                    process.send_signal(signal.SIGSTOP)
                except psutil.NoSuchProcess:
                    pass
            found = [root, *root.children(recursive=True)]
            if {p.pid for p in found} <= {p.pid for p in processes}:
                break
            processes = found
    except psutil.NoSuchProcess:
        return
    groups = set()
    for process in processes:
        try:
            groups.add(os.getpgid(process.pid))
        except ProcessLookupError:
            pass
    for group in groups - {own_group}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in processes:  # a process that shares the caller's group
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


_GLOO_ABORT = "terminate called without an active exception"


def run_launcher(cmd, extra_env=None, timeout=300, cwd=None):
    """Run a multi-process launch command (`accelerate launch`, `torchrun`, or a plain script) offline on CPU, assert it
    exits 0, and return its stdout followed by its stderr. `cwd`: the working folder (default: the current one).

    The launcher runs in its own session; on timeout it and every process it started are killed (`kill_process_tree`:
    no rank is left behind) and the test fails, saying a rank hung.
    """
    import os
    import subprocess
    import warnings
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(root),
        **(extra_env or {}),
    )
    cmd = [str(a) for a in cmd]
    for attempt in range(2):
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=cwd
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_tree(proc.pid)
            out, err = proc.communicate()
            pytest.fail(
                f"`{' '.join(cmd)}` did not exit within {timeout} s (a rank hung).\n{out[-3000:]}\n{err[-4000:]}"
            )
        # Known CPU/gloo flake (seen in about 1 of 10 full-suite runs, never in isolation): a rank aborts in C++ with
        # "terminate called without an active exception" (SIGABRT). It is retried once, visibly, and a second abort
        # fails the test. Tracked in docs/contributing.md.
        if proc.returncode != 0 and attempt == 0 and _GLOO_ABORT in err:
            warnings.warn(f"A rank aborted with {_GLOO_ABORT!r}; retrying once: {' '.join(cmd[-4:])}", stacklevel=2)
            continue
        break
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{out[-3000:]}\n{err[-4000:]}"
    return out + err


def accelerate_two_processes(*script_and_args, timeout=300, cwd=None):
    """Run `script_and_args` (a script path or `-m module`, then its arguments) under `accelerate launch` with 2 real
    CPU processes (gloo DDP); see `run_launcher`."""
    import sys

    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script_and_args,
    ]  # fmt: skip
    return run_launcher(cmd, {"ACCELERATE_USE_CPU": "1"}, timeout, cwd)


def torchrun_deepspeed(*script_and_args, nproc=1, timeout=300, cwd=None):
    """Run `script_and_args` under `torchrun --standalone` with `nproc` ranks and DeepSpeed on CPU
    (`DS_ACCELERATOR=cpu`; the script sets up gloo itself, see docs/contributing.md); see `run_launcher`."""
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc, *script_and_args]
    return run_launcher(cmd, {"DS_ACCELERATOR": "cpu"}, timeout, cwd)


def stand_in_vllm(monkeypatch, tokenizer):
    """Install a stand-in `vllm` module (the real one needs a CUDA GPU and is not installed here) that records its calls.

    Reply `j` of a request with seed `s` is the text `s<s>-<j>`, returned as vLLM returns a sample: its token ids, EOS
    included. Returns `(engines, requests)`: the `vllm.LLM` arguments of every engine built and the `SamplingParams`
    arguments of every request, in order.
    """
    import importlib.machinery
    import sys
    import types

    engines, requests = [], []

    def sampled(text):
        return types.SimpleNamespace(token_ids=tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])

    class LLM:
        def __init__(self, **kwargs):
            engines.append(kwargs)

        def generate(self, prompts, sampling, use_tqdm=True):
            requests.extend(p.kwargs for p in sampling)
            return [types.SimpleNamespace(outputs=[sampled(f"s{p.kwargs['seed']}-{j}") for j in range(p.kwargs["n"])])
                    for p in sampling]  # fmt: skip

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return engines, requests


def build_word_bandit(path, vocab):
    """A 1-layer Llama over a word-level vocabulary (`vocab[0]` is EOS and padding) with its tokenizer, saved to
    `path`; for the bandit toys whose completions are one token. Returns the tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=vocab[0], pad_token=vocab[0])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer
