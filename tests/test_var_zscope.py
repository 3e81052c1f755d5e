"""VAR's per-prompt normaliser (`z_scope="prompt"`): the pure weights by hand, the group sampler, layout independence
(accumulation and 2 processes), the closed-form fixed points of a bandit toy against the batch normaliser, equality
with online VAR's first-step weights, refusals."""

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests._helpers import accelerate_two_processes, cpu_args
from tests.distributed.var_prompt_layout import (
    ROWS,
    build_prompt_trainer,
    hand_logps_and_grad_model,
    run_prompt_layout,
)
from trl_rewardweighted import VARConfig, VARTrainer
from trl_rewardweighted.losses import online_var_weights, var_log_weights, var_prompt_loss, var_prompt_weights
from trl_rewardweighted.trainers.var_trainer import PromptGroupSampler, group_slot_size, prompt_group_ids

SCRIPT = Path(__file__).parent / "distributed" / "var_prompt_layout.py"


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


def softmax_by_hand(logits):
    finite = [x for x in logits if math.isfinite(x)]
    z = sum(math.exp(x) for x in finite)
    return [math.exp(x) / z if math.isfinite(x) else 0.0 for x in logits]


# ----------------------------------------------------------------------------------------------------------------------
# The pure functions
# ----------------------------------------------------------------------------------------------------------------------


def test_var_prompt_weights_by_hand():
    """Three interleaved groups, reference log-probs, a NaN reward and a masked row: one softmax per group."""
    beta = 0.5
    r = [1.0, 0.0, 2.0, float("nan"), -1.0, 3.0, 0.5]
    ref = [-3.0, -1.0, -2.0, -1.0, -4.0, -2.5, -1.5]
    g = [7, 3, 7, 3, 3, 9, 7]
    mask = [True, True, True, True, True, True, False]
    w = var_prompt_weights(torch.tensor(r), beta, torch.tensor(g), torch.tensor(ref), torch.tensor(mask))
    expected = [0.0] * 7
    for group in (7, 3, 9):
        rows = [i for i in range(7) if g[i] == group]
        logits = [r[i] / beta + ref[i] if mask[i] and math.isfinite(r[i]) else -math.inf for i in rows]
        for i, value in zip(rows, softmax_by_hand(logits)):
            expected[i] = value
    # group 7: rows 0, 2 (row 6 masked); group 3: rows 1, 4 (row 3 NaN); group 9: row 5 alone -> weight 1
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert w[5] == 1.0 and w[3] == 0.0 and w[6] == 0.0
    assert w.dtype == torch.float32 and not w.requires_grad
    # Without the reference term: softmax(r / beta) per group.
    w = var_prompt_weights(torch.tensor([0.0, 1.0, 10.0, 11.0]), 2.0, torch.tensor([0, 0, 1, 1]))
    e = math.exp(0.5) / (1 + math.exp(0.5))
    torch.testing.assert_close(w, torch.tensor([1 - e, e, 1 - e, e]), rtol=1e-6, atol=1e-7)


def test_var_prompt_weights_do_not_depend_on_other_prompts():
    r = torch.tensor([0.0, 1.0, 2.0, 5.0, 6.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1, 1])
    w = var_prompt_weights(r, 1.0, g)
    shifted = var_prompt_weights(torch.cat([r[:3], r[3:] - 100.0]), 1.0, g)
    assert torch.equal(w[:3], shifted[:3])
    torch.testing.assert_close(w[:3], torch.softmax(r[:3].float(), 0))
    # A large common offset and a tiny beta keep the exact differences (float64 centring per group).
    w = var_prompt_weights(
        torch.tensor([1e4 + 1e-3, 1e4 - 1e-3, -7.0], dtype=torch.float64), 1e-3, torch.tensor([0, 0, 1])
    )
    torch.testing.assert_close(w, torch.tensor([*torch.softmax(torch.tensor([1.0, -1.0]), 0).tolist(), 1.0]))


def test_var_prompt_weights_sample_weights_by_hand():
    r = torch.tensor([0.0, 1.0, 2.0, 0.5, -0.5])
    g = torch.tensor([0, 0, 0, 1, 1])
    s = torch.tensor([2.0, 0.0, 0.5, 1.0, 3.0])
    w = var_prompt_weights(r, 1.0, g, sample_weights=s)
    expected = softmax_by_hand([0.0 + math.log(2.0), -math.inf, 2.0 + math.log(0.5)]) + softmax_by_hand(
        [0.5, -0.5 + math.log(3.0)]
    )
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # Sample weights of 1 change nothing, bit for bit (also for the batch normaliser's log-weights).
    ones = torch.ones(5)
    assert torch.equal(var_prompt_weights(r, 0.7, g, sample_weights=ones), var_prompt_weights(r, 0.7, g))
    ref = torch.tensor([-3.0, -1.0, -2.0, -1.0, -4.0])
    assert torch.equal(var_log_weights(r, 0.7, ref, sample_weights=ones), var_log_weights(r, 0.7, ref))
    # A group whose rows all have sample weight 0 gets no weight.
    w = var_prompt_weights(r, 1.0, g, sample_weights=torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))
    assert w[3:].tolist() == [0.0, 0.0] and w[:3].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "bad,message",
    [
        ([1.0, -0.5, 1.0], r"`sample_weights` must be finite and >= 0; rows \[1\] have \[-0.5\]"),
        ([1.0, 1.0, float("nan")], r"`sample_weights` must be finite and >= 0; rows \[2\] have \[nan\]"),
        ([float("inf"), 1.0, 1.0], r"rows \[0\] have \[inf\]"),
    ],
)
def test_bad_sample_weights_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        var_prompt_weights(torch.zeros(3), 1.0, torch.tensor([0, 0, 1]), sample_weights=torch.tensor(bad))
    with pytest.raises(ValueError, match=message):
        var_log_weights(torch.zeros(3), 1.0, sample_weights=torch.tensor(bad))


def test_var_prompt_weights_refuse_bad_group_ids():
    with pytest.raises(ValueError, match=r"`group_ids` must be an integer tensor, got torch.float32"):
        var_prompt_weights(torch.zeros(2), 1.0, torch.zeros(2))
    with pytest.raises(ValueError, match=r"`group_ids` has shape \(3,\) but `rewards` has shape \(2,\)"):
        var_prompt_weights(torch.zeros(2), 1.0, torch.zeros(3, dtype=torch.long))


def test_var_prompt_loss_is_the_mean_over_prompts():
    r = torch.tensor([0.0, 1.0, 3.0, float("nan"), 2.0])
    g = torch.tensor([0, 0, 1, 2, 1])
    logp = torch.tensor([-1.0, -2.0, -0.5, -9.0, -3.0], requires_grad=True)
    loss = var_prompt_loss(logp, r, 1.0, g)
    w0 = softmax_by_hand([0.0, 1.0])
    w1 = softmax_by_hand([3.0, 2.0])
    # group 2 holds only a NaN reward: it has no weight and is not counted in the mean.
    expected = -((w0[0] * -1.0 + w0[1] * -2.0) + (w1[0] * -0.5 + w1[1] * -3.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -torch.tensor([w0[0], w0[1], w1[0], 0.0, w1[1]]) / 2)
    with pytest.raises(ValueError, match=r"No prompt group of a VAR batch of 2 rows keeps a weight"):
        var_prompt_loss(torch.zeros(2), torch.tensor([float("nan")] * 2), 1.0, torch.tensor([0, 1]))


def test_equal_to_online_var_weights_with_importance_sample_weights():
    """Sample weights 1/q turn replies drawn from q into online VAR's weights softmax(r/beta + log pi_ref - log q)."""
    torch.manual_seed(0)
    r = torch.randn(3, 4, dtype=torch.float64)
    ref = -5 * torch.rand(3, 4, dtype=torch.float64) - 1
    q = -5 * torch.rand(3, 4, dtype=torch.float64) - 1
    online, _ = online_var_weights(r, 0.6, ref, q)
    ids = torch.arange(3).repeat_interleave(4)
    s = torch.exp(-(q - q.max(dim=1, keepdim=True).values)).flatten()  # 1/q up to a per-prompt constant
    offline = var_prompt_weights(r.flatten(), 0.6, ids, ref.flatten(), sample_weights=s)
    torch.testing.assert_close(offline, online.flatten(), rtol=1e-6, atol=1e-7)
    # The policy's own samples (q = pi_ref): the weights are softmax(r / beta), i.e. ref_weighting=False.
    online, _ = online_var_weights(r, 0.6, ref, ref)
    torch.testing.assert_close(var_prompt_weights(r.flatten(), 0.6, ids), online.flatten(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------------
# Groups and the sampler
# ----------------------------------------------------------------------------------------------------------------------


def test_prompt_group_ids_and_slot_size():
    messages = [{"role": "user", "content": "a"}]
    assert prompt_group_ids(["a", "b", "a", messages, [dict(messages[0])], 3, 3], "prompt") == [0, 1, 0, 2, 2, 3, 3]
    with pytest.raises(ValueError, match=r"Column `group` has no value in rows \[1, 2\]"):
        prompt_group_ids([0, None, None], "group")
    assert [group_slot_size(n, 8) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert group_slot_size(5, 12) == 6
    with pytest.raises(ValueError, match=r"A group of 9 rows does not fit a step of 8 rows"):
        group_slot_size(9, 8)


def test_sampler_keeps_every_group_in_one_step():
    torch.manual_seed(0)
    sizes = torch.randint(1, 5, (23,)).tolist()
    group_ids = [g for g, n in enumerate(sizes) for _ in range(n)]
    perm = torch.randperm(len(group_ids)).tolist()  # rows of a group need not be contiguous in the dataset
    group_ids = [group_ids[i] for i in perm]
    step, round_size = 8, 4
    sampler = PromptGroupSampler(group_ids, group_slot_size(max(sizes), step), round_size, seed=3)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) and len(order) % round_size == 0
        seen = set()
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            groups = {group_ids[i] for i in chunk}
            for g in groups:  # every group of the step is there whole, and nowhere else
                assert {i for i, gid in enumerate(group_ids) if gid == g} <= set(chunk)
                assert g not in seen
            seen |= groups
        assert seen == set(group_ids)
        epochs.append(order)
    assert epochs[0] != epochs[1] != epochs[2]  # shuffled per epoch
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1]  # seeded by seed + epoch: a resumed run draws the same epoch
    assert list(PromptGroupSampler([0, 0, 1, 2, 2], 2, 4, shuffle=False)) == [0, 1, 2, 2, 3, 4, 3, 4]


# ----------------------------------------------------------------------------------------------------------------------
# The trainer: weights of a step, layouts
# ----------------------------------------------------------------------------------------------------------------------


def record_step_weights(trainer):
    """Wrap `_assign_step_weights` to keep, per step, each row's (group, row, reward, weight)."""
    steps = []
    assign = trainer._assign_step_weights

    def spy(batch_samples):
        assign(batch_samples)
        steps.append(
            [
                (int(g), int(i), float(r), float(w))
                for b in batch_samples
                for g, i, r, w in zip(b["group_ids"], b["row_ids"], b["rewards"], b["var_weights"])
            ]
        )

    trainer._assign_step_weights = spy
    return steps


def test_step_weights_are_per_prompt_and_averaged_over_prompts(tiny_model_path, tmp_path):
    """Groups of 3, 3 and 2 rows with sample weights, slots of 4 rows in a step of 8 (bs 2 x GA 4): every step holds
    whole groups, repeats get weight 0, each prompt's weights are its softmax divided by the step's prompts."""
    trainer, _ = build_prompt_trainer(tiny_model_path, str(tmp_path), 2, 4, max_steps=-1, num_train_epochs=2)
    assert trainer._var_slot_size == 4
    steps = record_step_weights(trainer)
    trainer.train()
    assert len(steps) == 4  # 2 epochs of 3 slots of 4 rows, padded to 16 rows: 2 steps each
    for step in steps:
        by_group = {}
        for g, i, _, w in step:
            by_group.setdefault(g, {}).setdefault(i, []).append(w)
        for g, rows in by_group.items():
            members = [i for i, gid in enumerate(ROWS["group"]) if gid == g]
            assert sorted(rows) == members  # whole group, no other row
            for weights in rows.values():  # a repeated row gets weight 0 on every copy but one
                assert sum(w > 0 for w in weights) <= 1
            logits = [ROWS["reward"][i] / 0.7 + math.log(ROWS["sample_weight"][i] or 1e-300) for i in members]
            expected = softmax_by_hand([x if ROWS["sample_weight"][i] else -math.inf for x, i in zip(logits, members)])
            got = [sum(rows[i]) * len(by_group) for i in members]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert [len({g for g, *_ in step}) for step in steps] == [2, 1, 2, 1]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["var/prompts"] for h in logs] == [2, 1, 2, 1]
    assert all(h["var/rows_skipped"] == 0 for h in logs)


@pytest.mark.parametrize("bs,ga", [(4, 2), (1, 8)])
def test_prompt_scope_gradient_is_layout_independent(tiny_model_path, tmp_path, bs, ga):
    reference, trainer = run_prompt_layout(tiny_model_path, str(tmp_path / "a"), bs=8, ga=1)
    assert trainer.state.log_history[0]["var/ess"] > 1.2  # non-degenerate weights
    grads, _ = run_prompt_layout(tiny_model_path, str(tmp_path / "b"), bs=bs, ga=ga)
    assert len(grads) == len(reference) == 2
    for got, expected in zip(grads, reference):
        assert rel_diff(got, expected) < 1e-5


def test_prompt_scope_gradient_equals_hand_per_prompt_loss(tiny_model_path, tmp_path):
    """The first step's gradient is the gradient of the mean over prompts of -sum_i w_i log pi(y_i|x) by hand."""
    rows = {k: v[:6] for k, v in ROWS.items()}  # groups 0 and 1, one step of 6 rows
    grads, _ = run_prompt_layout(tiny_model_path, str(tmp_path), bs=6, ga=1, rows=rows, max_steps=1)
    model, logps = hand_logps_and_grad_model(tiny_model_path, rows)
    loss = var_prompt_loss(
        logps,
        torch.tensor(rows["reward"]),
        0.7,
        torch.tensor(rows["group"]),
        sample_weights=torch.tensor(rows["sample_weight"]),
    )
    loss.backward()
    manual = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel_diff(grads[0], manual) < 1e-4


@pytest.mark.distributed
def test_two_processes_match_single_process(tiny_model_path, tmp_path):
    """2 processes x (bs 2 x GA 2) give the single-process (bs 8) gradients of both steps with z_scope="prompt" (the
    second step holds one padded group, on one micro-batch per process), and of z_scope="step" with sample weights."""
    prompt_ref, _ = run_prompt_layout(tiny_model_path, str(tmp_path / "single"), bs=8, ga=1)
    step_ref, _ = run_prompt_layout(tiny_model_path, str(tmp_path / "single_step"), 8, 1, z_scope="step", max_steps=1)
    accelerate_two_processes(SCRIPT, tiny_model_path, tmp_path, 2, 2)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"prompt_rank{rank}.pt")
        assert len(result["prompt"]) == 2 and len(result["step"]) == 1
        for got, expected in zip(result["prompt"] + result["step"], prompt_ref + step_ref):
            assert rel_diff(got, expected) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# A bandit toy: per-prompt vs batch normaliser, closed forms (docs/var.md, "A toy with two prompts")
# ----------------------------------------------------------------------------------------------------------------------

BANDIT_VOCAB = ["<eos>", "p", "q", "a", "b", "c"]
ARMS = [3, 4, 5]  # one-token completions " a", " b", " c" (+ EOS)
ARM_REWARDS = [0.0, 1.0, 2.0]


def _build_bandit(path):
    """A 1-layer Llama over 6 tokens: two prompts (p, q), three arms (a, b, c), EOS."""
    from tests._helpers import build_word_bandit

    return build_word_bandit(path, BANDIT_VOCAB)


def _arm_logps(model, prompt_id):
    """log pi(arm, EOS | prompt) for the three arms (float64)."""
    ids = torch.tensor([[prompt_id, arm, 0] for arm in ARMS])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    return lp[:, 0].gather(1, ids[:, 1:2])[:, 0] + lp[:, 1, 0]


def _tv(a, b):
    return 0.5 * float((a - b).abs().sum())


def batch_normaliser_fixed_point(log_weights):
    """Fixed point of the batch normaliser with steps of 2 rows drawn by a random permutation: row i's partner is
    uniform over the other N - 1 rows, so E[w_i] = mean_{j != i} sigmoid(l_i - l_j), and each prompt converges to its
    rows' E[w] renormalised (docs/var.md)."""
    n = log_weights.numel()
    diff = torch.sigmoid(log_weights[:, None] - log_weights[None, :])
    expected = (diff.sum(1) - 0.5) / (n - 1)  # drop the j == i term, sigmoid(0) = 0.5
    return expected[:3] / expected[:3].sum()


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    path = tmp_path_factory.mktemp("bandit")
    tokenizer = _build_bandit(path)
    return str(path), tokenizer


def _train_bandit(bandit, tmp_path, z_scope, q_shift, steps, bs, ref_weighting=False):
    from transformers import AutoModelForCausalLM

    path, tokenizer = bandit
    rewards = ARM_REWARDS + [r + q_shift for r in ARM_REWARDS]
    data = Dataset.from_dict(
        {"prompt": ["p"] * 3 + ["q"] * 3, "completion": [" a", " b", " c"] * 2, "reward": rewards}
    )
    args = VARConfig(
        **cpu_args(
            output_dir=str(tmp_path / f"{z_scope}{q_shift}{ref_weighting}"),
            per_device_train_batch_size=bs,
            max_steps=steps,
            z_scope=z_scope,
            beta=1.0,
            ref_weighting=ref_weighting,
            learning_rate=0.05,
            lr_scheduler_type="linear",
            max_grad_norm=0.0,
            logging_steps=steps,
        )
    )
    trainer = VARTrainer(model=path, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    ref = _arm_logps(AutoModelForCausalLM.from_pretrained(path), 1)
    return torch.softmax(_arm_logps(trainer.model, 1), 0), ref


def test_bandit_per_prompt_tilt_vs_batch_normaliser(bandit, tmp_path):
    """Prompts p and q, three one-token replies each with rewards [0, 1, 2] (q's shifted by 0 or -4), beta = 1.

    Per-prompt normaliser (both prompts in every step): p converges to softmax(r / beta) over its replies whatever
    q's rewards. Batch normaliser with steps of 2 random rows (the paper's setting: a step rarely holds all of a
    prompt's replies): p converges to the closed form of `batch_normaliser_fixed_point`, which moves when q's rewards
    are shifted (q's rows at -4 leave p's weights near 1, e^l / (e^l + S) with S small). Measured: TV to the closed
    forms ~0.006 (shift 0) and ~0.005 (shift -4) after 1000 steps."""
    tilt = torch.softmax(torch.tensor(ARM_REWARDS, dtype=torch.float64), 0)
    per_prompt = {}
    for shift in (0.0, -4.0):
        per_prompt[shift], _ = _train_bandit(bandit, tmp_path, "prompt", shift, steps=150, bs=6)
        assert _tv(per_prompt[shift], tilt) < 0.01, (per_prompt[shift].tolist(), tilt.tolist())
    assert _tv(per_prompt[0.0], per_prompt[-4.0]) < 1e-6  # q's rewards do not reach p at all

    batch, closed = {}, {}
    for shift in (0.0, -4.0):
        logw = torch.tensor(ARM_REWARDS + [r + shift for r in ARM_REWARDS], dtype=torch.float64)
        closed[shift] = batch_normaliser_fixed_point(logw)
        batch[shift], _ = _train_bandit(bandit, tmp_path, "step", shift, steps=1000, bs=2)
        assert _tv(batch[shift], closed[shift]) < 0.03, (shift, batch[shift].tolist(), closed[shift].tolist())
    # The closed forms: [0.170, 0.333, 0.496] and [0.273, 0.335, 0.391], against the tilt [0.090, 0.245, 0.665].
    assert closed[0.0].tolist() == pytest.approx([0.1702, 0.3333, 0.4965], abs=1e-4)
    assert closed[-4.0].tolist() == pytest.approx([0.2734, 0.3353, 0.3913], abs=1e-4)
    assert _tv(closed[0.0], closed[-4.0]) > 0.1 and _tv(batch[0.0], batch[-4.0]) > 0.07  # p moves with q's rewards
    assert min(_tv(batch[0.0], tilt), _tv(batch[-4.0], tilt)) > 0.1  # and is not p's own tilt


def test_bandit_per_prompt_tilt_with_reference(bandit, tmp_path):
    """With ref_weighting=True the per-prompt fixed point is softmax(r / beta + log pi_ref) over the replies."""
    p, ref = _train_bandit(bandit, tmp_path, "prompt", -4.0, steps=150, bs=6, ref_weighting=True)
    target = torch.softmax(torch.tensor(ARM_REWARDS, dtype=torch.float64) + ref, 0)
    assert _tv(target, torch.softmax(torch.tensor(ARM_REWARDS, dtype=torch.float64), 0)) > 0.01  # ref matters
    assert _tv(p, target) < 0.01, (p.tolist(), target.tolist())


# ----------------------------------------------------------------------------------------------------------------------
# Online VAR's first step on the policy's own samples
# ----------------------------------------------------------------------------------------------------------------------


def test_first_step_weights_equal_online_var_on_own_samples(tiny_model_path, tmp_path):
    """Replies sampled from the policy itself (q = pi_ref = the starting policy): VAR's per-prompt weights equal
    `online_var_weights(r, beta, log pi_ref, log q)` of online VAR's first step, with ref_weighting=False and with
    ref_weighting=True plus sample weights 1/q."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts, group = ["The cat", "A small dog"], 4
    torch.manual_seed(0)
    rows = {"prompt": [], "completion": [], "reward": []}
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=True, max_new_tokens=5, min_new_tokens=5, num_return_sequences=group)
        for seq in out:
            text = tok.decode(seq[ids.shape[1] :], skip_special_tokens=True)
            rows["prompt"].append(prompt)
            rows["completion"].append(text)
            rows["reward"].append(len(set(text)) / 4.0)
    beta = 0.8

    def first_step(ref_weighting, sample_weights=None):
        data = dict(rows, **({"sample_weight": sample_weights} if sample_weights is not None else {}))
        args = VARConfig(
            **cpu_args(output_dir=str(tmp_path / str(ref_weighting)), per_device_train_batch_size=8, max_steps=1),
            z_scope="prompt",
            beta=beta,
            ref_weighting=ref_weighting,
        )
        trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(data))
        steps = record_step_weights(trainer)
        trainer.train()
        weights = torch.zeros(len(rows["prompt"]))
        for _, i, _, w in steps[0]:
            weights[i] += w * len(prompts)  # the step's loss averages its 2 prompts
        return weights, trainer

    plain, trainer = first_step(ref_weighting=True)
    log_q = torch.tensor(trainer.train_dataset["ref_logps"], dtype=torch.float64)  # the policy at step 0
    r = torch.tensor(rows["reward"], dtype=torch.float64).view(2, group)
    online, _ = online_var_weights(r, beta, log_q.view(2, group), log_q.view(2, group))
    assert (online.max(dim=1).values < 0.9).all()  # not one-hot: the comparison is sensitive
    unweighted, _ = first_step(ref_weighting=False)
    torch.testing.assert_close(unweighted, online.flatten(), rtol=1e-5, atol=1e-6)
    # ref_weighting=True on own samples without a correction counts pi_ref twice: different weights.
    assert (plain - online.flatten()).abs().max() > 1e-2
    # ... and sample weights 1/q (scaled per prompt) undo it exactly.
    inverse_q = torch.exp(-(log_q.view(2, group) - log_q.view(2, group).max(1, keepdim=True).values)).flatten()
    corrected, _ = first_step(ref_weighting=True, sample_weights=inverse_q.tolist())
    torch.testing.assert_close(corrected, online.flatten(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Refusals and warnings
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(group_column="group"), r"VARConfig.group_column='group' is only used with z_scope='prompt' \(z_scope is 'step'\)"),
        (dict(z_scope="prompt", packing=True, max_length=64), r"z_scope='prompt' does not support `packing=True`: a pack mixes"),
        (dict(z_scope="prompt", eval_packing=True, max_length=64), r"does not support `eval_packing=True`"),
        (dict(z_scope="prompt", dataloader_drop_last=True), r"does not support `dataloader_drop_last=True`: dropping"),
        (dict(z_scope="prompt", train_sampling_strategy="group_by_length"), r"does not support `train_sampling_strategy='group_by_length'`"),
    ],
)  # fmt: skip
def test_config_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VARConfig(**cpu_args(output_dir="x", **kwargs))


def prompt_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, z_scope="prompt")
    base.update(kw)
    return VARConfig(**cpu_args(**base))


def test_trainer_refusals(tiny_model_path, tmp_path):
    rows = {k: ROWS[k] for k in ("prompt", "completion", "reward")}
    with pytest.raises(ValueError, match=r"the prompt group of rows \[0, 1, 2, 6, 7\] \(same `prompt`\) has 5 rows, but an "
                       r"optimizer step holds 4 rows \(per_device_train_batch_size=2 x gradient_accumulation_steps=2 x "
                       r"1 process\(es\)\)"):  # fmt: skip
        VARTrainer(tiny_model_path, args=prompt_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2),
                   train_dataset=Dataset.from_dict(rows))  # fmt: skip
    with pytest.raises(ValueError, match=r"groups rows by the `group` column, but the train dataset has none"):
        VARTrainer(
            tiny_model_path, args=prompt_args(tmp_path, group_column="group"), train_dataset=Dataset.from_dict(rows)
        )
    with pytest.raises(ValueError, match=r"needs map-style datasets, but the train dataset is an IterableDataset"):
        VARTrainer(
            tiny_model_path, args=prompt_args(tmp_path), train_dataset=Dataset.from_dict(rows).to_iterable_dataset()
        )
    with pytest.raises(ValueError, match=r"Column `group` has no value in rows \[3\]"):
        data = dict(ROWS, group=[0, 0, 0, None, 1, 1, 2, 2])
        VARTrainer(
            tiny_model_path, args=prompt_args(tmp_path, group_column="group"), train_dataset=Dataset.from_dict(data)
        )


def test_lone_rows_warn_and_get_weight_one(tiny_model_path, tmp_path):
    rows = {
        "prompt": ["The cat", "The cat", "A dog"],
        "completion": [" is red.", " is blue.", " runs."],
        "reward": [0.0, 1.0, 5.0],
    }
    with pytest.warns(UserWarning, match=r"1 of 2 prompt groups have a single row: each such row gets weight 1"):
        trainer = VARTrainer(tiny_model_path, args=prompt_args(tmp_path, per_device_train_batch_size=4, ref_weighting=False),
                             train_dataset=Dataset.from_dict(rows))  # fmt: skip
    steps = record_step_weights(trainer)
    trainer.train()
    by_row = {i: 0.0 for i in range(3)}
    for _, i, _, w in steps[0]:
        by_row[i] += w
    e = math.exp(1.0) / (1 + math.exp(1.0))
    assert [by_row[i] for i in range(3)] == pytest.approx([(1 - e) / 2, e / 2, 0.5], rel=1e-6)


def test_padding_repeats_warn(tiny_model_path, tmp_path):
    with pytest.warns(UserWarning, match=r"prompt groups have 2 to 3 rows; each fills a slot of 4 rows .* 4 repeated row\(s\) "
                      r"per epoch, 33% of the rows computed"):  # fmt: skip
        VARTrainer(tiny_model_path, args=prompt_args(tmp_path, group_column="group", per_device_train_batch_size=8),
                   train_dataset=Dataset.from_dict(ROWS))  # fmt: skip


def test_a_split_group_is_refused(tiny_model_path, tmp_path, monkeypatch):
    """A sampler other than the trainer's (here sequential, bs 4 over groups of 3) would split groups: refused."""
    trainer = VARTrainer(tiny_model_path, args=prompt_args(tmp_path, group_column="group", per_device_train_batch_size=4),
                         train_dataset=Dataset.from_dict(ROWS))  # fmt: skip
    monkeypatch.setattr(trainer, "_get_train_sampler", lambda *a: torch.utils.data.SequentialSampler(range(8)))
    with pytest.raises(
        ValueError, match=r"an optimizer step holds 1 of the 3 rows of prompt group 1 \(1 group\(s\) split\)"
    ):
        trainer.train()


def test_group_column_separates_equal_prompts_and_eval_runs(tiny_model_path, tmp_path):
    data = Dataset.from_dict(ROWS)
    trainer = VARTrainer(tiny_model_path, args=prompt_args(tmp_path, group_column="group", per_device_train_batch_size=8),
                         train_dataset=data, eval_dataset=data)  # fmt: skip
    assert trainer.train_dataset["_var_group"] == [0, 0, 0, 1, 1, 1, 2, 2]
    by_prompt = VARTrainer(
        tiny_model_path, args=prompt_args(tmp_path, per_device_train_batch_size=8), train_dataset=data
    )
    assert by_prompt.train_dataset["_var_group"] == [0, 0, 0, 1, 1, 1, 0, 0]
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_var/ess"] > 1.0
    metrics = trainer.evaluate(Dataset.from_dict(ROWS))  # prepared (and grouped) when given
    assert math.isfinite(metrics["eval_loss"])


def test_resume_mid_epoch_continues_the_same_group_order(tiny_model_path, tmp_path):
    """The group order of an epoch is seeded by seed + epoch: a run resumed in the middle of its second epoch sees the
    steps the uninterrupted run saw."""

    def groups_per_step(trainer, **kwargs):
        steps = record_step_weights(trainer)
        trainer.train(**kwargs)
        return [sorted({g for g, *_ in step}) for step in steps]

    common = dict(max_steps=-1, num_train_epochs=3)  # 3 groups, one per step of 4 rows: 9 steps
    trainer, _ = build_prompt_trainer(tiny_model_path, str(tmp_path / "full"), 2, 2, **common)
    full = groups_per_step(trainer)
    assert len(full) == 9 and full[:3] != full[3:6]  # reshuffled per epoch
    out = str(tmp_path / "resumed")
    trainer, _ = build_prompt_trainer(tiny_model_path, out, 2, 2, save_strategy="steps", save_steps=4, **common)
    groups_per_step(trainer)
    trainer, _ = build_prompt_trainer(tiny_model_path, out, 2, 2, **common)
    assert groups_per_step(trainer, resume_from_checkpoint=f"{out}/checkpoint-4") == full[4:]
