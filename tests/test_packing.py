"""data.packing (C10): prepared examples packed several to a row, first-fit in data order, no token attending
across examples (a block-diagonal causal mask and per-example positions, for the built-in GPT and Hugging Face
models), the loss token-weighted over the global batch as with one example a row (G2)."""
import math
import os
import sys

import numpy as np
import pytest
import torch
import yaml

import zoo
from test_prepare_text import chat_data, chat_settings, dry_run_and_diagnose_lines, prepared_examples  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import train_distill as T  # noqa: E402

PACKING = T.companion("packing", "data.packing")  # packing.py, as a packed run loads it


@pytest.fixture(scope="module")
def packing_teacher(chat_data, tmp_path_factory):
    """zoo's Hugging Face GPT-2 of the chat data's vocabulary, with room for rows of 256 tokens."""
    return zoo.hf_gpt2(tmp_path_factory.mktemp("packing") / "teacher", vocab=chat_data["data"]["vocab_size"],
                       positions=256)


def settings(chat_data, teacher, *extra):
    """chat_settings with rows of 256 tokens: 3 or 4 of the chat examples (50 to 72 tokens) fill one."""
    return chat_settings(chat_data, f"kd.hf_teacher_dir={teacher}", *extra, seq_len=255)


def test_c10_packing_is_first_fit_in_data_order_computed_from_the_example_bounds(tmp_path):
    """Room 8: 5 and 4 open rows 0 and 1, 3 fills row 0, 2 goes to row 1 (next-fit would open a third row);
    an example longer than the room is cut to it first (data.too_long truncate)."""
    np.save(tmp_path / "b.npy", np.cumsum([0, 5, 4, 3, 2, 11]))
    rows = T.example_rows(str(tmp_path / "b.npy"), T.file_stat(tmp_path / "b.npy"), 8, "truncate", True)
    groups = [rows["order"][a:b].tolist() for a, b in zip(rows["row_bounds"][:-1], rows["row_bounds"][1:])]
    assert groups == [[0, 2], [1, 3], [4]] and (rows["ends"] - rows["starts"]).tolist() == [5, 4, 3, 2, 8]
    padded = T.example_rows(str(tmp_path / "b.npy"), T.file_stat(tmp_path / "b.npy"), 8, "truncate", False)
    assert padded["order"].tolist() == [0, 1, 2, 3, 4] and padded["row_bounds"].tolist() == [0, 1, 2, 3, 4, 5]


def test_c10_g2_packed_rows_hold_whole_examples_with_their_own_positions_and_the_same_targets(chat_data,
                                                                                              packing_teacher):
    cfg, _ = T.resolve_config(None, settings(chat_data, packing_teacher, "data.packing=true"))
    train = T.TokenWindows(cfg, "train")
    examples = prepared_examples(chat_data["root"] / "data", "train")
    split = chat_data["manifest"]["splits"]["train"]
    assert len(train) == T.window_count(cfg, "train") < len(examples) / 3  # short chats: several a row
    x, y, pos = train[np.arange(len(train))]
    seen, ex = [], train.examples
    for row in range(len(train)):
        at = 0
        for i in ex["order"][ex["row_bounds"][row]:ex["row_bounds"][row + 1]]:
            ids, mask = examples[i]
            n, seen = len(ids), seen + [i]
            assert x[row, at:at + n - 1].tolist() == ids[:-1].tolist()
            assert pos[row, at:at + n - 1].tolist() == list(range(n - 1))
            # the example's targets exactly as in its own padded row; its first token is no target of the one before
            assert y[row, at:at + n - 1].tolist() == np.where(mask[1:] == 1, ids[1:], T.IGNORE).tolist()
            assert at == 0 or y[row, at - 1] == T.IGNORE
            at += n
        assert (y[row, at - 1:] == T.IGNORE).all()
    assert sorted(seen) == list(range(len(examples)))
    assert train.count(np.arange(len(train))) == split["loss_tokens"] == int((y != T.IGNORE).sum())
    lengths = np.array([len(ids) for ids, _ in examples])
    assert T.padding_share(lengths, len(train), cfg["data.seq_len"]) < 0.5 * T.padding_share(
        lengths, len(lengths), cfg["data.seq_len"])


def test_c10_g2_a_packed_examples_first_token_is_no_target_of_the_example_before_it(chat_data, tmp_path):
    """{"text"} examples train every token: packed, the last token of one example and the first of the next are
    neighbours in a row, yet that pair is no target (as in padded rows, where a first token has nothing before it)."""
    import prepare_text as P
    from test_prepare_text import words, write_jsonl
    rng = np.random.default_rng(5)
    src = write_jsonl(tmp_path / "src" / "text.jsonl", [{"text": words(rng, int(rng.integers(2, 9)))}
                                                        for _ in range(30)])
    assert P.main([src, "--tokenizer", chat_data["tok"], "--out", str(tmp_path / "data")]) == 0
    data = [f"data.{k}={v}" for k, v in yaml.safe_load((tmp_path / "data" / "data.yaml").read_text())["data"].items()]
    cfg, _ = T.resolve_config(None, data + ["data.seq_len=40", "data.packing=true"])
    train = T.TokenWindows(cfg, "train")
    x, y, pos = train[np.arange(len(train))]
    lengths = train.examples["ends"] - train.examples["starts"]
    assert len(train) < len(lengths) / 2 and int((pos == 0).sum()) >= len(lengths)
    assert int((y != T.IGNORE).sum()) == int((lengths - 1).sum()) == train.count(np.arange(len(train)))
    ex, later = train.examples, 0
    for row in range(len(train)):  # where each later example of a row begins: its first token is no target
        for at in np.cumsum(lengths[ex["order"][ex["row_bounds"][row]:ex["row_bounds"][row + 1]]])[:-1]:
            assert pos[row, at] == 0 and y[row, at - 1] == T.IGNORE and y[row, at - 2] != T.IGNORE
            later += 1
    assert later > len(train)


def packed_row(vocab, seed):
    """ids and positions [1, 14] of a row packing examples of 4, 3, 5 tokens, then 2 of padding."""
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 0, 0]])
    return torch.randint(3, vocab, pos.shape, generator=torch.Generator().manual_seed(seed)), pos


def assert_examples_apart(lm, vocab):
    """Changing the middle example's tokens leaves the other examples' logits unchanged, and the last example's
    logits are those it has alone (its own positions); without the positions they are not."""
    x, pos = packed_row(vocab, 0)
    other = x.clone()
    other[0, 4:7] = packed_row(vocab, 1)[0][0, 4:7]
    lm.eval()
    with torch.no_grad():
        a, b, alone, mixed = lm(x, positions=pos)[0], lm(other, positions=pos)[0], lm(x[:, 7:12])[0], lm(x)[0]
    assert not torch.allclose(a[0, 4:7], b[0, 4:7])
    assert torch.allclose(a[0, :4], b[0, :4], rtol=0, atol=1e-6) and torch.allclose(a[0, 7:], b[0, 7:], rtol=0,
                                                                                      atol=1e-6)
    assert torch.allclose(a[0, 7:12], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0, 7:12], alone[0], rtol=1e-3, atol=1e-3)  # the test can fail


def test_c10_no_attention_across_packed_examples_in_the_built_in_gpt():
    torch.manual_seed(0)
    assert_examples_apart(T.GPT(100, 16, 2, 2, 16), 100)


@pytest.mark.parametrize("kind", ["builtin", "gpt2"])
def test_c10_e11_an_export_scores_packed_rows_with_each_example_apart_as_the_run_does(kind, tmp_path):
    """--evaluate EXPORT: evaluate() gives the export the rows' positions (None unpacked), and ExportedLM passes them
    to the built-in GPT, or to a Hugging Face model with the block-diagonal mask (it took tokens alone: every
    export's --evaluate was a TypeError, packed or not, the README's command included)."""
    torch.manual_seed(0)
    if kind == "builtin":
        lm = T.GPT(100, 16, 2, 2, 16)
    else:
        transformers = pytest.importorskip("transformers")
        lm = transformers.AutoModelForCausalLM.from_pretrained(zoo.hf_gpt2(tmp_path / kind, vocab=100)).float()
    assert_examples_apart(T.companion("distill_evaluate", "--evaluate").ExportedLM(lm), 100)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_c10_no_attention_across_packed_examples_in_hugging_face_models(kind, attention, tmp_path):
    """zoo's Llama (RoPE: position_ids) and GPT-2 (learned positions) take the block-diagonal 4D mask, boolean for
    sdpa, additive for eager; packing_check's probe passes them."""
    transformers = pytest.importorskip("transformers")
    path = getattr(zoo, f"hf_{kind}")(tmp_path / kind, vocab=100)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).float()
    lm = T.hf_models("student.hf_dir").HFCausalLM(model, False)
    assert_examples_apart(lm, 100)
    cfg = {"data.packing": True, "data.seq_len": 16, "data.vocab_size": 100, "data.train_bin": "train.bin"}
    assert PACKING.packing_check(lm, cfg, "student.hf_dir", "the student") is lm
    n = 8  # packing_check's probe row; a plain causal mask in place of the block-diagonal one:
    lm.packed_mask = lambda positions: torch.ones(n, n, dtype=torch.bool).tril()[None, None] if attention == "sdpa" \
        else torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -1e30)[None, None]
    with pytest.raises(T.ConfigError) as err:  # the probe refuses a model that lets the examples see each other
        PACKING.packing_check(lm, cfg, "student.hf_dir", "the student")
    assert err.value.problems[0][:2] == ("C10", "data.packing") and "attend to each other" in err.value.problems[0][2]
    model.config._attn_implementation = "flash_attention_2"  # position_ids alone: no mask to give it, refused
    with pytest.raises(T.ConfigError) as err:
        PACKING.packing_check(lm, cfg, "student.hf_dir", "the student")
    assert "'flash_attention_2', which takes no block-diagonal mask" in err.value.problems[0][2]


def test_c10_g2_a_packed_global_batch_has_the_padded_ones_loss_update_and_eval(chat_data, packing_teacher,
                                                                                tmp_path):
    """Every example in each optimizer step: 3 micro-batches of padded rows against 2 of packed rows (and packed
    with kd.chunk_tokens, the chunked loss, D6), the
    student the built-in GPT, the teacher zoo's Hugging Face GPT-2 (CE, KD and hidden-state terms): the same step-1
    loss and terms, the same parameters after 2 steps and the same evals, to float32 round-off (G2: token-weighted over
    the global batch, whatever the rows)."""
    common = settings(chat_data, packing_teacher, "train.epochs=2", "train.max_steps=null", "optim.name=sgd",
                      "optim.momentum=0", "optim.weight_decay=0", "optim.lr=0.5", "schedule.type=constant",
                      "schedule.warmup=0", "train.clip_grad_norm=null", "train.eval_every=1", "data.val_windows=null")
    runs, rows = {}, {}
    for name, extra in (("padded", []), ("packed", []), ("chunked", ["kd.chunk_tokens=16"])):
        packed = [f"data.packing={name != 'padded'}"] + extra  # chunked: packed, the loss 16 positions at a time
        cfg, _ = T.resolve_config(None, common + packed)
        rows[name], accum = T.window_count(cfg, "train"), 3 if name == "padded" else 2
        cfg, _ = T.resolve_config(None, common + packed + [f"train.grad_accum={accum}",
                                                           f"train.batch_size={-(-rows[name] // accum)}"])
        outcome, run = T.train(cfg, str(tmp_path / name), "none", quiet=True)
        assert outcome == "finished" and run["state"]["global_step"] == 2
        runs[name] = (run["module"].state_dict(), *T.read_metrics(str(tmp_path / name))[:2])
    assert rows["packed"] < rows["padded"] / 2
    (padded, steps, evals) = runs["padded"]
    for packed, steps_p, evals_p in (runs["packed"], runs["chunked"]):
        for key in ("loss", "loss/ce", "loss/kd", "loss/hidden", "grad_norm"):
            assert math.isclose(steps[1][key], steps_p[1][key], rel_tol=1e-5), key
        for name, p in padded.items():
            assert torch.allclose(p, packed[name], rtol=1e-5, atol=1e-6), name
        for s in (1, 2):
            assert math.isclose(evals[s]["val/loss"], evals_p[s]["val/loss"], rel_tol=1e-5)
            assert evals[s]["val/agreement"] == evals_p[s]["val/agreement"]


def test_c10_r4_g2_a_packed_run_on_two_processes_resumes_bit_exactly_and_equals_one_process(chat_data,
                                                                                           packing_teacher, tmp_path):
    """Packed rows under torchrun (2 processes, gloo, batch 1 each), SIGKILLed inside step 5 and relaunched: the
    same last.pt bit for bit. Against one process of batch 2 (in-process, one thread): the same optimizer steps,
    losses and terms to round-off, the same weights (G2): each process trained its own half of every global
    micro-batch of packed rows (two halves alike, or one half twice, would not add up to the one-process step),
    with the rows' positions and loss mask as one process has them."""
    from run_records import distill_killed_and_resumed
    from test_ddp import one_thread
    packed = settings(chat_data, packing_teacher, "data.packing=true", "train.grad_accum=2", "train.epochs=2")
    clean, resumed, run_dir = distill_killed_and_resumed(packed + ["train.batch_size=1"], tmp_path, processes=2)
    assert len(clean) >= 6 and all(clean[s]["loss"] == resumed[s]["loss"] for s in clean if s in resumed)
    assert "rows of packed examples" in open(os.path.join(run_dir, "train.log")).read()
    cfg, _ = T.resolve_config(None, packed + ["train.batch_size=2"])
    with one_thread():
        outcome, run = T.train(cfg, str(tmp_path / "one"), "none", quiet=True)
    two = torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), map_location="cpu", weights_only=True)
    assert outcome == "finished" and two["world_size"] == 2 and two["global_step"] == run["plan"]["total_steps"]
    one = T.read_metrics(str(tmp_path / "one"))[0]
    assert sorted(one) == sorted(clean) == list(range(1, run["plan"]["total_steps"] + 1))
    for key in ("loss", "loss/ce", "loss/kd", "grad_norm"):
        assert np.allclose([one[s][key] for s in one], [clean[s][key] for s in one], rtol=1e-5), key
    for name, p in run["module"].state_dict().items():
        assert torch.allclose(p, two["model"][name], rtol=1e-4, atol=1e-6), name


def test_c10_e5_the_dry_runs_export_check_takes_packed_rows(chat_data, packing_teacher, tmp_path):
    """--dry_run of a data.packing config was a ValueError traceback after 'best.pt written': its export check
    unpacked the val rows as (x, y), and packed rows carry their positions too."""
    cfg, _ = T.resolve_config(None, settings(chat_data, packing_teacher, "data.packing=true", "train.max_steps=3",
                                             "train.epochs=null"))
    assert T.train(cfg, str(tmp_path), "none", quiet=True)[0] == "finished"
    assert T.export_matches_best(str(tmp_path), cfg, T.build_teacher(cfg, torch.device("cpu")))


def test_c10_r9_the_teacher_cache_of_packed_rows_is_their_teachers_and_keyed_on_their_layout(
        chat_data, packing_teacher, tmp_path, capsys):
    """Offline KD on packed rows: the teacher ran on the packed rows with their mask, so step 1 equals online
    top-k's on them; the same cache is refused (one line naming data.packing) to a run of padded rows."""
    common = settings(chat_data, packing_teacher, "kd.top_k=8", "kd.gamma=0", "train.max_steps=3", "train.epochs=null",
                      "data.packing=true")
    losses = []
    for extra in ([], [f"kd.teacher_cache={tmp_path / 'cache'}"]):
        cfg, _ = T.resolve_config(None, common + extra)
        assert T.train(cfg, str(tmp_path / f"run{len(extra)}"), "none", quiet=True)[0] == "finished"
        losses.append(T.read_metrics(str(tmp_path / f"run{len(extra)}"))[0][1]["loss/kd"])
    assert math.isclose(*losses, rel_tol=1e-5)
    lines, nothing = dry_run_and_diagnose_lines(settings(chat_data, packing_teacher, "kd.top_k=8", "kd.gamma=0",
                                                         f"kd.teacher_cache={tmp_path / 'cache'}"), tmp_path, capsys)
    assert len(set(lines)) == 1 and len(lines) == 3 and nothing, lines
    assert lines[0].startswith("config error: data.packing:") and "packed rows (data.packing true)" in lines[0]


@pytest.mark.parametrize("extra,why", [
    (["kd.on_policy_fraction=0.5"], "each example continues its own prompt"),
    (["kd.seq_kd=true"], "(kd.on_policy_fraction > 0 or kd.seq_kd)"),
    (["student.target=zoo:tiny_causal_lm"], "is a user module (token ids -> logits)"),
    (None, "the built-in corpus holds no examples"),
    ("stream", "holds no examples prepared by prepare_text.py")])
def test_c10_packing_what_cannot_keep_examples_apart_is_one_line_exit_2_from_run_dry_run_and_diagnose(
        extra, why, chat_data, packing_teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(HERE)  # student.target's zoo module
    if extra == "stream":  # the same tokens as a plain stream (no manifest, no EXAMPLES_MARK), cut into windows
        for split in ("train", "val"):
            ids = np.fromfile(chat_data["data"][f"{split}_bin"], chat_data["data"]["dtype"])
            ids[:-len(T.EXAMPLES_MARK)].tofile(tmp_path / f"{split}.bin")
        extra = [f"data.{split}_bin={tmp_path / split}.bin" for split in ("train", "val")]
    chosen = settings(chat_data, packing_teacher, "data.packing=true", *extra) if extra else ["data.packing=true"]
    if extra and "student.target=zoo:tiny_causal_lm" in extra:
        chosen += [f"student.kwargs={{vocab: {chat_data['data']['vocab_size']}}}", "kd.gamma=0"]
    lines, nothing = dry_run_and_diagnose_lines(chosen, tmp_path, capsys)
    assert len(set(map(str, lines))) == 1 and len(lines) == 3 and nothing, lines
    assert lines[0].startswith("config error: data.packing:") and why in lines[0], lines[0]
