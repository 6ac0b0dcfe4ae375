"""benchmarks/bench.py at tiny sizes: every measurement function runs and reports sane numbers.

No timing is asserted (speed is the benchmark's business, not the tests'); the host-read count is a
count, so G7 (one host sync per optimizer step) is pinned here.
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench  # noqa: E402
from run_records import records  # noqa: E402

SMALL_DATA = ["data.synthetic.num_train=40", "data.synthetic.num_val=16", "data.synthetic.length=256",
              "train.batch_size=8", "schedule.warmup=2", "train.eval_batch_size=16"]
TINY = bench.LOOP_SETTINGS + SMALL_DATA + ["train.epochs=2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    captured = bench.capture_run(TINY, str(tmp_path_factory.mktemp("bench") / "run"))
    yield captured
    bench.close_run(captured[0])


def test_loop_overhead_runs_the_real_fit_and_reports_both_ratios(tiny_run):
    result = bench.bench_loop("tiny", tiny_run, repeats=1, blocks=1)
    run = tiny_run[0]
    assert result["steps"] == run["plan"]["total_steps"] == 6  # ceil(ceil(40/8)/2) = 3 steps x 2 epochs
    with open(os.path.join(run["run_dir"], "metrics.jsonl")) as f:
        events = [json.loads(line).get("event") for line in f]
    assert events.count("finished") == 4  # the real fit() ran to the end: warm-up + repeat, with and without writes
    assert result["ratio"] > 0 and result["kit_ms_per_step"] > 0 and result["bare_ms_per_step"] > 0
    assert result["ratio_no_writes"] > 0 and result["saves"] >= 3  # last.pt each epoch, best.pt at the first eval

    assert result["step"]["ratio"] > 0 and result["eval_ms"] is not None
    assert result["same_weights"]  # the two sides trained the same recipe, bit for bit


def test_g2_g3_the_kit_trains_bit_identically_to_a_bare_loop_with_clip_grad_norm(tmp_path):
    # What makes the overhead ratio honest: fit() with its guards, its one-read G3 norm and its clip that
    # skips clip_grad_norm_'s identity multiply ends with exactly the bare loop's weights, on a run where
    # some steps clip and some do not.
    run, task, _ = captured = bench.capture_run(TINY + ["train.clip_grad_norm=1.6", "train.log_every=1"], str(tmp_path / "run"))
    try:
        bench.reset_run(run)
        bench.kit_fit(run, task, [], [])()
        bare = bench.bare_loop(run, task)
        bare()
        for name, kit_tensor in run["module"].state_dict().items():
            assert torch.equal(kit_tensor, bare.model.state_dict()[name]), name
        norms = [r["grad_norm"] for r in records(run["run_dir"]) if "grad_norm" in r]
        assert len(norms) == 6 and min(norms) < 1.6 < max(norms), norms
    finally:
        bench.close_run(captured[0])


def test_g7_one_host_sync_per_optimizer_step_in_fit(tiny_run):
    syncs = bench.bench_syncs(*tiny_run[:2])
    assert syncs["steps"] == 6
    assert syncs["per_step"] == 1 and syncs["max_in_a_step"] == 1, syncs["sites"]  # G7: the one .tolist()
    assert syncs["sites"] == ["train_probe.py:optimizer_step .tolist()"]


def test_g7_sync_counter_sees_a_per_micro_batch_item(tiny_run):
    run, task = tiny_run[:2]
    loss = task["loss"]

    def chatty_loss(model, batch):  # the classic bug: loss.item() on every micro-batch
        value, parts = loss(model, batch)
        value.item()
        return value, parts

    syncs = bench.bench_syncs(run, dict(task, loss=chatty_loss))
    assert syncs["per_step"] > 1 and syncs["max_in_a_step"] == 3  # 2 micro-batches + the step's own read
    assert any("chatty_loss .item()" in site for site in syncs["sites"])


def test_topk_kd_measures_time_and_peak_memory_of_kd_kl():
    out = bench.bench_topk(repeats=1, vocabs=(512,), rows=8, k=16)
    row = out[512]
    assert row["full_ms"] > 0 and row["topk_ms"] > 0 and row["time_ratio"] > 0
    # the full KD path holds at least the two [rows, V] log-softmax outputs at once
    assert row["full_mb"] >= 2 * row["logits_mb"] and row["topk_mb"] > 0


def test_d6_chunked_kd_bench_reports_memory_and_time_ratios_of_the_same_loss():
    import train_distill as td
    sizes = {"batch": 2, "seq": 32, "vocab": 4096, "width": 8, "chunk": 8}
    out = bench.bench_kd_chunk(repeats=1, memory_runs=2, sizes=sizes)
    assert out["chunked_ms"] > 0 and out["unchunked_ms"] > 0 and out["time_ratio"] > 0
    # the allocator's peak is deterministic: every run the same bytes
    assert len(set(out["chunked_mb"])) == 1 and len(set(out["unchunked_mb"])) == 1
    # unchunked holds at least the student's and the teacher's [batch, seq, vocab] logits; the chunk of 8 of 64
    # positions far less: the benchmark measures kd.chunk_tokens, not the same path twice
    assert out["unchunked_mb"][0] >= 2 * out["logits_mb"] and out["mem_ratio"] < 0.5
    summary = bench.summary({"kd_chunk": out, "quick": True})
    assert summary["kd_chunk_mem_ratio_128k"] == out["mem_ratio"] and summary["kd_chunk_time_ratio_128k"] == out["time_ratio"]
    assert [row[3] for row in bench.build_rows({"kd_chunk": out})] == ["<= 0.25", "<= 1.3"]
    # both sides are the same loss (chunked_terms vs token_cross_entropy + kd_kl on whole logits)
    inputs = bench.kd_chunk_inputs(td, **sizes)
    settings = dict(bench.KD_CHUNK, **sizes)
    chunked = bench.kd_chunk_step(td, inputs, **settings)()
    unchunked = bench.kd_chunk_step(td, inputs, **dict(settings, chunk=0))()
    torch.testing.assert_close(chunked, unchunked)


def test_offline_kd_bench_times_four_sides_of_the_real_distill_step(tmp_path, capsys):
    import train_distill as td
    out = bench.bench_offline(1, str(tmp_path), cases={"tiny": ["data.limit=16", "data.val_windows=4", "train.batch_size=4",
                                                                "data.seq_len=16"]}, steps={"tiny": 1})
    row = out["tiny"]
    for side in ("offline_topk", "online_topk", "online_full", "offline_sampled"):
        assert row[side]["ms_per_step"] > 0 and row[side]["step_peak_mb"] > 0
    assert row["draws"] == 31 and row["sampled_bytes_per_token"] == row["bytes_per_token"]  # equal bytes: k - 1 draws
    assert row["offline_sampled"]["teacher_mb"] == 0 and row["sampled_vs_topk_step_ratio"] > 0
    # offline holds no teacher: the online sides' held tensors include the teacher's weights, offline's do not
    assert row["offline_topk"]["teacher_mb"] == 0 and row["online_topk"]["teacher_mb"] > 0
    assert row["online_topk"]["held_mb"] == row["online_full"]["held_mb"]
    assert row["online_topk"]["held_mb"] >= row["offline_topk"]["held_mb"] + row["online_topk"]["teacher_mb"]
    assert row["positions"] == (16 + 4) * 16 and row["bytes_per_token"] == 32 * (4 + 2) + 4  # fp32 values, uint16 ids
    assert row["offline_topk_step_ratio"] > 0 and row["offline_topk_mem_ratio"] > 0
    summary = bench.summary({"offline": {"demo": row}, "quick": True})
    assert summary["offline_step_ratio"] == row["offline_topk_step_ratio"]
    assert summary["offline_mem_ratio"] == row["offline_topk_mem_ratio"]
    assert summary["offline_sampled_vs_topk_step_ratio"] == row["sampled_vs_topk_step_ratio"]
    assert any("sampled cache" in r[1] for r in bench.build_rows({"offline": {"demo": row}}))
    teacher_run = tmp_path / "offline_tiny" / "teacher"
    calibration = bench.next_token_calibration(td, str(teacher_run / "checkpoints" / "last.pt"))
    logged = [r for r in records(str(teacher_run)) if "val/loss" in r][-1]
    assert abs(calibration["val_loss"] - logged["val/loss"]) < 1e-5 and 0 <= calibration["ece"] <= 1
    assert bench.main(["--calibration", str(teacher_run / "checkpoints" / "last.pt")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ece"] == calibration["ece"]


def test_dry_run_rate_and_scheduler_tool():
    out = bench.bench_dry_run(steps=300, repeats=1)
    assert out["steps_per_s"] > 0
    if "tool_skipped" not in out:
        assert out["tool_exit"] == 0 and out["tool_passed"] and out["tool_steps_per_s"] > 0


def test_cache_benchmark_runs_the_real_train_both_ways(tmp_path):
    out = bench.bench_cache(2, 1, str(tmp_path), settings=SMALL_DATA)
    assert out["epochs"] == 2 and out["on_s"] > 0 and out["off_s"] > 0 and out["speedup"] > 0


def test_last_line_is_json_with_every_headline_key(capsys):
    bench.torch.set_num_threads(2)  # not the suite's one thread (conftest.py), so a leak of --threads 1 shows
    try:
        assert bench.main(["--quick", "--only", "dry_run"]) == 0
        assert bench.torch.get_num_threads() == 2  # the benchmark's --threads 1 does not leak into the caller
    finally:
        bench.torch.set_num_threads(1)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    for key in ("overhead_ratio", "syncs_per_step", "epochs", "cache_speedup", "topk_time_ratio_32k",
                "topk_mem_ratio_32k", "dryrun_steps_per_s", "offline_step_ratio", "offline_mem_ratio",
                "kd_chunk_mem_ratio_128k", "kd_chunk_time_ratio_128k",
                "overhead_ratio_noise", "trl_step_ratio", "trl_offline_step_ratio", "distill_overhead_ratio",
                *bench.ONPOLICY_KEYS, *bench.V128K_KEYS, *bench.CHAT_KEYS):
        assert key in summary
    assert summary["dryrun_steps_per_s"] > 0 and summary["overhead_ratio"] is None  # not run: null, not made up
    assert summary["offline_step_ratio"] is None and summary["kd_chunk_mem_ratio_128k"] is None


def test_trl_peer_rows_run_all_four_sides_on_equal_work_and_reach_the_json_line(tmp_path):
    """The distillation peer's plumbing at toy size (16-wide GPT-2s, 3 steps, no timed meaning): the kit's
    fit(), the bare loop, TRL's GKDTrainer and the kit's offline run all train; the equal-work check holds
    (the same step-1 loss on all three online sides, kit and bare loop bit-identical); the ratios reach the
    table and the last JSON line."""
    out = bench.bench_trl(1, str(tmp_path), steps=3, warmup=1, width=16)
    assert out["equal_first_loss"] and out["kit_bare_bit_identical"], out["first_loss"]
    assert out["first_loss"]["kit"] > 0.1  # a real KL to compare, not ~0 (the teacher is initialised wider)
    for key in ("trl_step_ratio", "trl_offline_step_ratio", "distill_overhead_ratio"):
        assert out[key] > 0 and out[key + "_noise"] is None  # one round: no noise estimate, and none made up
    rows = bench.build_rows({"trl": out})
    assert [r[3] for r in rows] == ["<= 0.9", "<= 0.5", "<= 1.05"] and all("not comparable" not in r[4] for r in rows)
    summary = bench.summary({"trl": out, "quick": True})
    assert summary["trl_step_ratio"] == out["trl_step_ratio"] and summary["distill_overhead_ratio"] == out["distill_overhead_ratio"]


def test_trl_peer_without_trl_is_a_skipped_row_and_null_ratios(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError: a machine without it
    out = bench.bench_trl(1, str(tmp_path), steps=3)
    assert "skipped" in out and "pip install trl" in out["skipped"]
    assert bench.build_rows({"trl": out})[0][2] == "skipped"
    assert bench.summary({"trl": out, "quick": True})["trl_step_ratio"] is None


def test_onpolicy_rows_time_kit_gkd_and_generation_on_equal_work_and_reach_the_json_line(tmp_path):
    """The on-policy rows' plumbing at toy size (16-wide GPT-2s, 2 prompts of 8 tokens + 8 sampled, 3 steps): the
    kit's on-policy fit(), the same run at fraction 0, GKDTrainer lmbda 1, the kit's generate() and model.generate
    all run; both trainers generated and scored batch x new tokens every step (the equal-work check); the ratios
    reach the table with their targets and the JSON line, with no noise estimate made up from one round."""
    out = bench.bench_onpolicy(1, str(tmp_path), steps=3, warmup=1, width=16, sizes={"prompt": 8, "new": 8, "batch": 2})
    assert out["equal_work"], (out["kit_generated_per_step"], out["gkd_generated"])
    assert out["kit_generated_per_step"] == [16] and out["gkd_generated"] == [((2, 16), 16)]
    assert out["trl_onpolicy_step_ratio"] > 0 and out["generate_tokens_per_s_ratio"] > 0
    assert out["onpolicy_extra_over_generate"] is not None
    assert all(out[key] is None for key in bench.ONPOLICY_KEYS if key.endswith("_noise"))
    rows = bench.build_rows({"onpolicy": out})
    assert [r[3] for r in rows] == ["<= 0.8", "<= 1.5", "report"] and all("not comparable" not in r[4] for r in rows)
    summary = bench.summary({"onpolicy": out, "quick": True})
    assert all(summary[key] == out[key] for key in bench.ONPOLICY_KEYS)


def test_128k_rows_check_equal_step_one_loss_and_measure_memory_from_the_allocator(tmp_path):
    """The 128k rows at toy size (vocabulary 4,096, 16 wide): the kit's chunked KD and GKDTrainer give the same
    step-1 loss (equal work), the chunked side's peak tensor memory is below GKD's (it never holds a [batch, seq,
    vocab] logits tensor), and the ratios reach the table and the JSON line."""
    out = bench.bench_trl_128k(1, str(tmp_path), steps=3, warmup=1,
                               sizes={"vocab": 4096, "batch": 2, "width": 16, "chunk": 16})
    assert out["equal_first_loss"] and out["first_loss"]["kit"] > 0.1, out["first_loss"]
    assert 0 < out["trl_mem_ratio_128k"] < 1 and out["gkd_mb"] > 4 * out["logits_mb"]
    assert out["trl_step_ratio_128k"] > 0 and out["trl_step_ratio_128k_noise"] is None
    rows = bench.build_rows({"trl_128k": out})
    assert [r[3] for r in rows] == ["<= 0.7", "<= 0.3"] and all("not comparable" not in r[4] for r in rows)
    summary = bench.summary({"trl_128k": out, "quick": True})
    assert all(summary[key] == out[key] for key in bench.V128K_KEYS)


def test_c10_chat_row_times_the_kit_and_gkdtrainer_on_the_same_chat_rows_after_the_equal_loss_check(tmp_path):
    """The chat row's plumbing at toy size (3 steps of 4 conversations, one round): the kit's fit() on the
    prepared examples and GKDTrainer on the raw rows (its own collator) give the same step-1 loss and nearly the
    same weights (tests/test_trl_chat.py checks 20 steps at three betas); the ratio reaches the table and the
    JSON line, with no noise estimate made up from one round."""
    pytest.importorskip("trl")
    out = bench.bench_trl_chat(1, str(tmp_path), steps=3, warmup=1, sizes={"width": 32})
    assert out["equal_first_loss"] and out["first_loss"]["kit"] > 0.05, out["first_loss"]
    assert out["max_weight_diff"] < 1e-4 and out["rows"] == 18 and out["trl_chat_step_ratio"] > 0
    assert out["trl_chat_step_ratio_noise"] is None
    rows = bench.build_rows({"trl_chat": out})
    assert [r[3] for r in rows] == ["report"] and "not comparable" not in rows[0][4] and "(equal)" in rows[0][1]
    summary = bench.summary({"trl_chat": out, "quick": True})
    assert all(summary[key] == out[key] for key in bench.CHAT_KEYS)
    with pytest.MonkeyPatch.context() as patch:  # a machine without trl: a skipped row and null ratios
        patch.setitem(sys.modules, "trl", None)
        skipped = bench.bench_trl_chat(1, str(tmp_path / "none"), steps=3)
    assert "pip install trl" in skipped["skipped"] and bench.build_rows({"trl_chat": skipped})[0][2] == "skipped"
    assert bench.summary({"trl_chat": skipped, "quick": True})["trl_chat_step_ratio"] is None


def test_c10_packing_row_measures_padding_waste_and_time_per_trained_token_on_equal_work(tmp_path):
    """The packing row's plumbing at toy size (40 conversations, rows of 128 tokens, one round): both sides train
    the same tokens of the same examples, packing leaves less of the rows to padding in fewer rows, and the waste
    and the ratio reach the table and the JSON line."""
    pytest.importorskip("transformers")
    out = bench.bench_packing(1, str(tmp_path), sizes={"conversations": 40, "seq_len": 127, "width": 16})
    assert out["equal_work"] and out["trained_tokens"]["packed"] > 0
    assert out["rows"]["packed"] < out["rows"]["padded"] and out["waste"]["packed"] < out["waste"]["padded"]
    assert out["steps"]["packed"] < out["steps"]["padded"] and out["packed_time_per_token_ratio"] > 0
    rows = bench.build_rows({"packing": out})
    assert [r[3] for r in rows] == ["report", "report"] and "(equal)" in rows[1][1]
    summary = bench.summary({"packing": out, "quick": True})
    assert summary["packing_waste"] == out["waste"] and summary["packing_packed_time_per_token_ratio"] > 0
