"""The sampled teacher cache (kd.teacher_cache_mode: sampled; Anshumann et al. 2025, random-sampling KD): the
teacher's tokens drawn per position with importance weights, stored in the top-k cache's layout. Its gradient is
unbiased for forward KL's (top-k's is not), its bytes depend only on (seed, position), and it is refused in the
other mode. The same tiny token files, teacher and loop as tests/test_offline.py."""
import json
import subprocess

import numpy as np
import pytest
import torch

from test_distill import ckpt, data, kd_settings, teacher  # noqa: F401 (fixtures)
from test_offline import (CLEAN_ENV, build, build_in_one_and_two_processes, cache_code, command, file_hashes, offline,
                          killed_build_beside_its_reference)
from test_cache_checks import refused, refused_alike
import train_distill as T
from run_records import run_together

SAMPLED = ["kd.teacher_cache_mode=sampled", "kd.top_k=null", "kd.cache_samples=6"]


def sampled(data, teacher, cache, *extra):
    return offline(data, teacher, cache, *SAMPLED, *extra)


@pytest.fixture(scope="module")
def cache(data, teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("sampled") / "teacher_cache"
    build(sampled(data, teacher, path))
    return str(path)


# ----------------------------------------------------------------------------- (1) the estimator
def kd_grad(student, teacher_numbers=None, teacher_logits=None, T_=2.0):
    """d(T^2 forward KL) / d(student logits), from a cache's numbers (kl_topk) or the full teacher (kd_kl)."""
    s = student.clone().requires_grad_()
    if teacher_numbers is None:
        loss = T.kd_kl(s, teacher_logits, T_).sum()
    else:
        loss = T.kl_topk(T.log_probs(s, T_), *teacher_numbers).sum()
    (loss * T_ ** 2).backward()
    return s.grad


@pytest.mark.parametrize("proposal", [None, 1.0, 4.0], ids=["proposal=T", "proposal=1", "proposal=4"])
def test_e12_sampled_cache_gradient_is_unbiased_for_forward_kl_and_topk_is_not(proposal):
    """One batch (8 positions, vocab 256, T = 2) and 4,096 independent sampled caches of it, 15 draws per
    position each (seeds 0-3 x 1,024 copies of the batch at other cache rows: the draws depend on (seed, row,
    position)). The mean of the student's KD gradient over the first M caches converges to full KD's, its
    relative error shrinking as 1 / sqrt(M x 15 draws): 8x from M = 64 to 4,096 (allowed 5x-13x; measured
    7.1x-8.1x). The top-16 cache (the same stored bytes: 16 slots) has one gradient, whose error (0.196) stays
    at least 2.5x the sampled mean's at M = 4,096 (measured 0.018-0.066 by proposal). Fixed seeds: the same
    numbers on every run."""
    gen = torch.Generator().manual_seed(0)
    t_logits = torch.randn(1, 8, 256, generator=gen) * 3
    student = torch.randn(1, 8, 256, generator=gen) * 1.5
    full = kd_grad(student, teacher_logits=t_logits)
    copies = 1024
    grads = torch.cat([kd_grad(student.expand(copies, -1, -1), cache_code().teacher_sampled(
        t_logits.expand(copies, -1, -1), 2.0, 15, proposal, 0, 0, seed=s)) for s in range(4)])
    assert torch.isfinite(grads).all()

    def error(m):
        return float((grads[:m].mean(0) - full).norm() / full.norm())

    topk = float((kd_grad(student, T.teacher_topk(t_logits, 2.0, 16)) - full).norm() / full.norm())
    assert 5 < error(64) / error(4096) < 13, (error(64), error(4096))
    assert error(4096) < 0.08 and topk > 2.5 * error(4096), (error(4096), topk)


def test_sampled_cache_numbers_are_weights_of_drawn_tokens_with_the_teacher_top1_first():
    """The stored numbers: slot 0 = first_token (E3, what val/agreement reads), weights = count / draws with
    proposal = T (they sum to 1 and only drawn ids weigh), rest -inf, one slot more than the draws."""
    t_logits = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(1))
    log_w, index, rest = cache_code().teacher_sampled(t_logits, 2.0, 7, None, 0, 0)
    assert index.shape == (2, 5, 8) and torch.equal(index[..., 0], T.first_token(t_logits))
    assert torch.allclose(log_w.exp().sum(-1), torch.ones(2, 5)) and torch.isinf(rest).all()
    counts = (log_w.exp() * 7).round()
    assert torch.allclose(log_w.exp() * 7, counts, atol=1e-5) and (counts.sum(-1) == 7).all()
    for ids, w in zip(index.flatten(0, 1).tolist(), log_w.flatten(0, 1).exp().tolist()):
        drawn = [i for i, x in zip(ids, w) if x > 0]
        assert len(set(drawn)) == len(drawn) and drawn[1 if w[0] > 0 else 0:] == sorted(drawn[1 if w[0] > 0 else 0:])


# ----------------------------------------------------------------------------- (2) the same bytes
def test_sampled_draws_depend_on_the_position_not_on_the_chunking():
    """Rows 0-5 in one call equal rows 0-2 and 3-5 in two calls (first_row 0 and 3): a chunk size, a process
    count or a resumed build cannot move a draw. Another seed or stream (split) draws otherwise."""
    t_logits = torch.randn(6, 4, 64, generator=torch.Generator().manual_seed(2))
    whole = cache_code().teacher_sampled(t_logits, 2.0, 5, None, 0, 0)
    parts = [cache_code().teacher_sampled(t_logits[a:b], 2.0, 5, None, 0, a) for a, b in ((0, 3), (3, 6))]
    for i in range(3):
        assert torch.equal(whole[i], torch.cat([p[i] for p in parts]))
    assert not torch.equal(whole[1], cache_code().teacher_sampled(t_logits, 2.0, 5, None, 1, 0)[1])
    assert not torch.equal(whole[1], cache_code().teacher_sampled(t_logits, 2.0, 5, None, 0, 0, seed=1)[1])


def test_sampled_cache_build_killed_mid_chunk_resumes_to_the_same_bytes(data, teacher, tmp_path):
    settings = sampled(data, teacher, tmp_path / "c")
    killed_build_beside_its_reference(settings, sampled(data, teacher, tmp_path / "ref"), tmp_path)
    assert not json.load(open(tmp_path / "c" / "manifest.json"))["complete"]
    resumed = subprocess.run(command(settings, "--cache_teacher"), env=CLEAN_ENV, capture_output=True, text=True,
                             cwd=tmp_path)
    assert resumed.returncode == 0 and "continuing" in resumed.stdout, resumed.stderr
    assert file_hashes(tmp_path / "c") == file_hashes(tmp_path / "ref")


def test_sampled_cache_is_the_same_bytes_from_one_and_two_torchrun_processes(data, teacher, tmp_path):
    build_in_one_and_two_processes(sampled(data, teacher, tmp_path / "one"), sampled(data, teacher, tmp_path / "two"),
                                   tmp_path)
    assert file_hashes(tmp_path / "one") == file_hashes(tmp_path / "two")


def test_sampled_cache_holds_teacher_sampled_of_every_window_and_its_settings(data, teacher, cache):
    cfg, _ = T.resolve_config(None, sampled(data, teacher, cache))
    manifest, frozen = cache_code().read_manifest(cache), T.build_teacher(cfg, torch.device("cpu"))
    assert (manifest["kd.teacher_cache_mode"], manifest["kd.cache_samples"], manifest["kd.top_k"]) == ("sampled", 6, None)
    assert manifest["kd.cache_proposal_temperature"] == 2.0  # null resolved: kd.temperature
    val = T.TokenWindows(cfg, "val")
    rows = T.eval_windows(cfg, len(val))
    with torch.no_grad():
        want = cache_code().teacher_sampled(frozen(val[rows][0])[0], 2.0, 6, 2.0, 1, 0)
    got = cache_code().TeacherCacheWindows(val, cache, manifest, "val").teacher(np.arange(len(rows)))
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], atol=1e-6)


# ----------------------------------------------------------------------------- (3) refusals
@pytest.fixture(scope="module")
def topk_cache(data, teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("topk") / "teacher_cache"
    build(offline(data, teacher, path))
    return str(path)


def test_c3_r10_a_cache_of_the_other_mode_is_refused_by_the_run_the_dry_run_and_diagnose(
        data, teacher, cache, topk_cache, tmp_path):
    """A top-k cache under a sampled run and a sampled cache under a top-k run (and other draws): one line
    naming the key, exit 2, no run dir, the cache untouched; --dry_run and diagnose_and_fix.py say the same."""
    before = file_hashes(cache), file_hashes(topk_cache)
    cases = [(sampled(data, teacher, topk_cache), "kd.teacher_cache_mode", 'built with kd.teacher_cache_mode "topk"'),
             (offline(data, teacher, cache), "kd.teacher_cache_mode", 'built with kd.teacher_cache_mode "sampled"'),
             (sampled(data, teacher, cache, "kd.cache_samples=9"), "kd.cache_samples", "built with kd.cache_samples 6"),
             (sampled(data, teacher, cache, "kd.cache_proposal_temperature=1"), "kd.cache_proposal_temperature", "2.0")]
    for settings, key, word in cases:
        refused_alike(settings, key, tmp_path, word)
    assert (file_hashes(cache), file_hashes(topk_cache)) == before


BAD = [(["kd.top_k=8"], "kd.top_k", "not the top-k"), (["kd.teacher_cache=null"], "kd.teacher_cache_mode", "needs"),
       (["kd.cache_samples=0"], "kd.cache_samples", ">= 1"),
       (["kd.cache_proposal_temperature=0"], "kd.cache_proposal_temperature", "> 0"),
       (["kd.divergence=tvd"], "kd.divergence", "forward KL only"),
       (["kd.divergence=skew_kl"], "kd.divergence", "forward KL only")]


@pytest.mark.parametrize("bad,key,word", BAD, ids=[b[1] + "-" + b[0][0].split("=")[1] for b in BAD])
def test_c3_e12_sampled_config_errors(bad, key, word, data, teacher, tmp_path):
    refused(sampled(data, teacher, tmp_path / "absent") + bad, key, tmp_path, word)
    assert not (tmp_path / "absent").exists()


def test_e12_sampled_cache_takes_forward_kl_and_its_exact_aliases(data, teacher, tmp_path):
    for extra in ([], ["kd.divergence=jsd", "kd.jsd_beta=0"], ["kd.divergence=skew_kl", "kd.skew_alpha=0"]):
        T.resolve_config(None, sampled(data, teacher, tmp_path / "absent", *extra))


# ----------------------------------------------------------------------------- (4) training from it
def test_r4_training_from_a_sampled_cache_resumes_bit_exact_after_sigkill(data, teacher, cache, tmp_path):
    settings = sampled(data, teacher, cache)
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    clean, killed = run_together((command(settings, run_dir=uninterrupted), {"env": CLEAN_ENV}),
                                 (command(settings, run_dir=interrupted), {"env": {**CLEAN_ENV, "KIT_FAULT_KILL_AT": "5:1"}}))
    assert clean.returncode == 0, clean.stderr
    assert "6 sampled tokens" in open(uninterrupted / "train.log").read()
    assert killed.returncode == -9, killed.stderr
    resumed = subprocess.run(command(settings, run_dir=interrupted), env=CLEAN_ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert T.checkpoint_tensors_equal(uninterrupted / "checkpoints" / "last.pt", interrupted / "checkpoints" / "last.pt")
    a, b = T.read_metrics(str(uninterrupted))[0], T.read_metrics(str(interrupted))[0]
    assert sorted(a) == sorted(b) == list(range(1, 9)) and all(a[s]["loss"] == b[s]["loss"] for s in a)
    assert ckpt(interrupted)["global_step"] == 8


def test_sampled_cache_of_a_teacher_with_masked_tokens_has_no_nan_and_a_finite_gradient():
    """A teacher whose logits are -inf on some ids (a padded vocabulary): those are never drawn, weigh 0 (not
    -inf - -inf = nan) in an empty slot, at a proposal temperature too, and the student's gradient is finite."""
    t_logits = torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(3))
    t_logits[..., :6] = float("-inf")
    for proposal in (None, 1.0):
        numbers = cache_code().teacher_sampled(t_logits, 2.0, 18, proposal, 0, 0)
        assert not torch.isnan(numbers[0]).any() and (numbers[1][numbers[0] > float("-inf")] >= 6).all()
        assert torch.isfinite(kd_grad(torch.randn(2, 3, 20), numbers)).all()
