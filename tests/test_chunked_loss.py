"""kd.chunk_tokens (D6): the head, CE and KD terms computed a chunk of positions at a time from the last
hidden states, each chunk's gradient taken in the forward (ChunkedLoss). Loss and gradients equal the unchunked path
to float round-off (fp32) for full KD, top-k KD and offline (cached top-k) KD, with kd.alpha / kd.beta at 0
or not, at chunk sizes that divide the token count and one that does not; then whole runs, built-in and
Hugging Face, against their unchunked twins."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from test_ddp import one_thread
from run_records import last_per_step, records, teacher_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_distill as td  # noqa: E402


def chunked():
    """chunked_loss.py as train_distill.py loads it beside itself (the chunked loss is that companion's)."""
    return td.companion("chunked_loss", "kd.chunk_tokens")


def unchunked(hidden, weight, y, t_hidden, t_weight, alpha, beta, temperature, top_k, cached):
    """The loss the kit computes without chunking: logits [B, T, V], then the same terms (make_task's loss)."""
    logits = F.linear(hidden, weight)
    real = y != td.IGNORE
    ce = td.token_cross_entropy(logits, y)
    if cached is not None:
        kl = td.kd_kl_topk(logits, *cached, temperature)
    else:
        kl = td.kd_kl(logits, F.linear(t_hidden, t_weight), temperature, top_k)
    return alpha * ce + beta * torch.where(real, kl, 0.0).sum()


@pytest.mark.parametrize("mode", ["full", "top_k", "offline"])
@pytest.mark.parametrize("alpha, beta", [(0.5, 0.5), (0.0, 1.0), (1.0, 0.0)])
def test_d6_chunked_loss_and_gradients_equal_the_unchunked_path(mode, alpha, beta):
    gen = torch.Generator().manual_seed(0)
    b, t, d, v, k, temperature = 3, 11, 16, 97, 5, 2.0  # 33 positions
    hidden = torch.randn(b, t, d, generator=gen, requires_grad=True)
    weight = torch.randn(v, d, generator=gen).mul_(0.3).requires_grad_()
    t_hidden, t_weight = torch.randn(b, t, 24, generator=gen), torch.randn(v, 24, generator=gen) * 0.3
    y = torch.randint(0, v, (b, t), generator=gen)
    y[0, :4] = td.IGNORE  # padding positions count for nothing
    top_k = k if mode != "full" else None
    cached = td.teacher_topk(F.linear(t_hidden, t_weight), temperature, k) if mode == "offline" else None
    want = unchunked(hidden, weight, y, t_hidden, t_weight, alpha, beta, temperature, top_k, cached)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    side, online = (cached, False) if cached is not None else ((t_hidden, t_weight, None), True)
    for chunk in (7, 11, 1000):  # 7 does not divide the 33 positions, 11 does, 1000 is one chunk
        got, ce, kd = chunked().chunked_terms(hidden, (weight, None), y, side, online, alpha, beta, temperature, top_k, chunk)
        assert torch.allclose(alpha * ce + beta * kd, got.detach())  # the logged parts add up to the loss
        grads = torch.autograd.grad(got, (hidden, weight))
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (chunk, got.item(), want.item())
        for g, w in zip(grads, want_grads):
            assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), chunk


def test_d6_the_loss_never_holds_more_than_one_chunk_of_logits():
    """What autograd keeps at any time: one chunk's logits inside its own step (its gradient is taken in the
    forward), then the gradients for the backward; never [positions, vocab]."""
    hidden = torch.randn(2, 64, 8, requires_grad=True)
    weight = torch.randn(5000, 8, requires_grad=True)
    y = torch.randint(0, 5000, (2, 64))
    kept = []

    def pack(tensor):
        kept.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ce = chunked().chunked_terms(hidden, (weight, None), y, (), False, 1.0, 0.0, 1.0, None, 16)[0]
    assert max(kept) <= 16 * 5000 and ce.requires_grad  # one chunk of 16 positions, not 128 x 5000
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        td.token_cross_entropy(F.linear(hidden, weight), y)
    assert max(kept) >= 128 * 5000  # the unchunked path keeps the whole logits


TINY = [s for s in td.DRY_RUN_SETTINGS + ["teacher.n_layer=1", "teacher.n_head=2", "teacher.n_embd=32"] if not s.startswith(("train.epochs", "train.max_steps"))]
TINY += ["train.epochs=null", "train.max_steps=4", "train.eval_every=4", "train.max_loss_share=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("chunk")
    cfg, _ = td.resolve_config(None, teacher_run(TINY))
    with one_thread():
        assert td.train(cfg, str(path / "teacher"), "none", quiet=True)[0] == "finished"
    return str(path / "teacher" / "checkpoints" / "best.pt")


def unchunked_and_chunked(settings, chunk, tmp_path):
    """The same run at kd.chunk_tokens 0 and `chunk`: losses, gradient norms and evals equal to round-off
    (a KL near 1e-3 is a difference of O(1) sums: atol for it). Returns both runs' records by chunk size."""
    results = {}
    for size in (0, chunk):
        cfg, _ = td.resolve_config(None, settings + [f"kd.chunk_tokens={size}"])
        with one_thread():
            assert td.train(cfg, str(tmp_path / str(size)), "none", quiet=True)[0] == "finished"
        results[size] = records(str(tmp_path / str(size)))
    for key in ("loss", "grad_norm", "val/loss"):
        assert np.allclose(last_per_step(results[0], key), last_per_step(results[chunk], key), rtol=1e-5, atol=1e-6), key
    return results


@pytest.mark.parametrize("extra", [["kd.top_k=null"], ["kd.top_k=8", "kd.gamma=0", "kd.alpha=0"], ["kd.enabled=false"]],
                         ids=["full_kd_with_hidden", "top_k_beta_only", "plain_lm"])
def test_d6_a_chunked_run_equals_the_unchunked_run(teacher, extra, tmp_path):
    kd = teacher_run(TINY) if extra == ["kd.enabled=false"] else \
        TINY + ["kd.enabled=true", f"kd.teacher_checkpoint={teacher}", "kd.gamma=0.1"] + extra  # plain LM: student.*
    results = unchunked_and_chunked(kd, 7, tmp_path)
    # the eval scores chunk by chunk too (D6): the same agreement with the teacher, token for token
    assert last_per_step(results[0], "val/agreement") == last_per_step(results[7], "val/agreement")


def test_d6_e14_seq_kd_and_on_policy_runs_chunked_equal_unchunked(teacher, tmp_path, monkeypatch):
    """kd.seq_kd's micro-batches (the teacher's continuation as data) and the on-policy ones (the student's, scored
    by on_policy.py, which took whole logits of both networks) go through the chunked loss: the same losses,
    gradient norms and evals as unchunked, and no forward but generation's asks a network for its logits."""
    whole, forward, train = {0: 0, 7: 0}, td.GPT.forward, td.train

    def counted(module, idx, logits=True, past=None, positions=None):  # generation's are [B, vocab] (past given)
        whole[chunk[0]] += logits and past is None
        return forward(module, idx, logits, past, positions)

    chunk = [None]
    monkeypatch.setattr(td.GPT, "forward", counted)
    monkeypatch.setattr(td, "train", lambda cfg, *a, **k: chunk.__setitem__(0, cfg["kd.chunk_tokens"]) or train(
        cfg, *a, **k))
    kd = TINY + ["kd.enabled=true", f"kd.teacher_checkpoint={teacher}", "kd.seq_kd=true", "kd.on_policy_fraction=0.5",
                 "kd.top_k=null", "kd.gamma=0.1"]
    results = unchunked_and_chunked(kd, 7, tmp_path)
    assert whole[0] > 0 and whole[7] == 0, whole
    for kind in ("seq_kd", "on_policy"):  # both kinds were drawn, the same micro-batches in both runs
        counts = [last_per_step(results[size], f"{kind}/micro_batches") for size in (0, 7)]
        assert counts[0] == counts[1] and sum(counts[0]) > 0, (kind, counts)


def test_d6_hugging_face_student_and_teacher_chunked_equal_unchunked(tmp_path):
    pytest.importorskip("transformers")
    student, teacher = zoo.hf_gpt2(tmp_path / "s", dropout=0.0), zoo.hf_llama(tmp_path / "t")
    kd = TINY + ["kd.enabled=true", f"student.hf_dir={student}", f"kd.hf_teacher_dir={teacher}", "kd.gamma=0"]
    unchunked_and_chunked(kd, 5, tmp_path)


def test_d6_chunking_a_network_whose_head_is_unknown_is_one_config_error(tmp_path):
    cfg, _ = td.resolve_config(None, teacher_run(TINY) + ["student.target=zoo:tiny_causal_lm", "kd.chunk_tokens=8"])
    with pytest.raises(td.ConfigError) as err:
        td.train(cfg, str(tmp_path / "run"), "none", quiet=True)
    assert "kd.chunk_tokens" in str(err.value) and "D6" in str(err.value.problems[0][0])
    assert not os.path.exists(tmp_path / "run")
