"""C10, E13: train_distill.py on chat data prepared by prepare_text.py equals TRL's GKDTrainer on the same raw
rows: the same loss mask as GKD's own collator, the same step-1 loss at TRL's beta 0, 0.5 and 1, and the same
weights after 20 steps. TRL is a test extra (skipped without it), never a dependency of the kit. The pair, the
data and GKD's side are benchmarks/bench.py's (its chat row times the same two runs)."""
import json
import os
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "benchmarks")]
import bench  # noqa: E402
import prepare_text as P  # noqa: E402
import train_distill as T  # noqa: E402


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """The ChatML tokenizer, Llama-style student (2 x 32) and teacher (4 x 32), 90 single-turn conversations
    prepared for the kit (81 train rows: 20 steps of 4 in one epoch)."""
    pytest.importorskip("trl")  # installed here and by .ci/run; never a dependency of the kit
    pytest.importorskip("datasets")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return bench.chat_equal_work(str(tmp_path_factory.mktemp("trl_chat")))


def gkd_collator(chat):
    import transformers
    from trl.experimental.utils import DataCollatorForChatML
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat["tokenizer"])
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, DataCollatorForChatML(tokenizer=tokenizer, max_length=chat["seq_len"] + 1)


def test_c10_the_prepared_mask_is_gkd_collators_labels_on_single_turn_chat_and_every_assistant_turn_on_multi_turn(
        chat):
    """Every train row: prepare_text.py's ids and loss mask are what DataCollatorForChatML makes of the raw row
    (its padding is on the left, so a row's tokens are its last ones). A multi-turn row is where they differ
    (docs/train_distill.md): the collator trains the last assistant turn, the kit every one."""
    tokenizer, collator = gkd_collator(chat)
    out, split = chat["prepared"], None
    with open(os.path.join(out, "manifest.json")) as f:
        split = json.load(f)["splits"]["train"]
    ids = np.fromfile(os.path.join(out, split["file"]), np.uint16).astype(np.int64)
    mask = np.fromfile(os.path.join(out, split["mask"]), np.uint8)
    starts = np.load(os.path.join(out, split["starts"]))
    batch = collator(chat["train_rows"])
    assert len(starts) - 1 == len(chat["train_rows"]) == len(batch["input_ids"])
    for row, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        n, width = b - a, batch["input_ids"].shape[1]
        assert batch["input_ids"][row, width - n:].tolist() == ids[a:b].tolist()
        assert (batch["labels"][row, width - n:] != -100).tolist() == (mask[a:b] == 1).tolist()
        assert not batch["attention_mask"][row, :width - n].any() and (batch["labels"][row, :width - n] == -100).all()
    assert len({int(b - a) for a, b in zip(starts[:-1], starts[1:])}) > 5  # rows of many lengths: padding is tested
    turns = [{"role": "user", "content": "sort the list"}, {"role": "assistant", "content": "the list"},
             {"role": "user", "content": "why"}, {"role": "assistant", "content": "please explain"}]
    kit_ids, kit_mask = P.encode_row(tokenizer, ("messages", True), {"messages": turns}, ("multi.jsonl", 1))
    theirs = collator([{"messages": turns}])
    assert theirs["input_ids"][0].tolist() == kit_ids
    assert tokenizer.decode(np.array(kit_ids)[np.array(kit_mask) == 1]) == "the list <|im_end|> please explain <|im_end|>"
    assert tokenizer.decode(theirs["input_ids"][0][theirs["labels"][0] != -100]) == "please explain <|im_end|>"


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is faster (no OpenMP barrier waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_c10_e13_kit_on_prepared_chat_equals_trl_gkdtrainer_step_one_loss_and_weights_after_20_steps(
        chat, beta, tmp_path, one_thread):
    """The kit's own run (train(): kd.alpha 0, kd.beta 1, kd.divergence jsd, kd.jsd_beta = TRL's beta, T 1,
    AdamW without weight decay, constant LR, clipping at 1.0) and GKDTrainer (lmbda 0, seq_kd off, HF Trainer's
    own AdamW from the same values) on the same rows in the same order: the step-1 losses agree within 1e-5 and
    after 20 steps every weight within 1e-4 (measured: 0 / 0 / 6e-8 and 2e-6 / 5e-6 / 6e-7 at beta 0 / 0.5 / 1),
    while training moved them by 0.02 and GKD at beta 0.501 against the kit at 0.5 ends 2e-3 away. What is left
    is fp32 round-off that AdamW magnifies where a gradient is as small as its eps (1e-8): there
    lr * g / (|g| + eps) turns a round-off of g into a visible step; it appears in the first steps and does not
    grow."""
    cfg, _ = T.resolve_config(None, bench.chat_settings(chat, 20, beta))
    outcome, run = T.train(cfg, str(tmp_path / "kit"), "none", quiet=True)
    assert outcome == "finished" and run["plan"]["total_steps"] == 20
    kit_loss = T.read_metrics(str(tmp_path / "kit"))[0][1]["loss"]
    _, gkd_loss, gkd_weights = bench.gkd_chat_side(T, run, chat, str(tmp_path), beta)()
    assert abs(kit_loss - gkd_loss) <= 1e-5 and kit_loss > 0.05, (kit_loss, gkd_loss)  # a real divergence
    import transformers
    start = transformers.AutoModelForCausalLM.from_pretrained(chat["student"]).state_dict()
    kit_weights = run["module"].lm.model.state_dict()
    moved = max(float((w - start[name]).abs().max()) for name, w in kit_weights.items())
    apart = max(float((w - gkd_weights[name]).abs().max()) for name, w in kit_weights.items())
    assert apart <= 1e-4 and moved > 0.01, (apart, moved)
