"""Data pipeline: tokenizer, packing against a brute-force stream, loader sharding and resume,
seqpar-prepare, synthetic lengths, the embedded corpus."""
import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seqpar.data import (EOS_ID, IGNORE_INDEX, VOCAB_SIZE, ArrayDocuments, PackedLoader, PackedSequences,
                         SyntheticDocuments, TokenFile, build_dataset, decode, encode, load_embedded_corpus,
                         synthetic_lengths)
from seqpar.data.prepare import main as prepare_main, prepare

SHARED_LENGTHS = Path(__file__).parents[2] / "shared/data/doc_lengths"


def test_tokenizer_round_trip():
    text = "def f(x):\n    return 'héllo ✓ 🐍'\n"
    ids = encode(text)
    assert ids.dtype == np.uint16 and ids.max() < 256 and len(ids) == len(text.encode())
    assert decode(ids) == text
    assert decode(np.concatenate([ids, [EOS_ID]])) == text
    assert decode(encode("✓")[:2]) == "\ufffd"  # a cut multi-byte character does not raise
    assert VOCAB_SIZE == EOS_ID + 1


def random_docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n).astype(np.uint16) for n in lengths]


def brute_force(docs, seq_len):
    """Every window, built from the materialised stream by the plain definition."""
    stream, is_eos, is_start = [], [], []
    for d in docs:
        stream += [int(t) for t in d] + [EOS_ID]
        is_start += [True] + [False] * len(d)
        is_eos += [False] * len(d) + [True]
    windows = []
    for i in range((len(stream) - 1) // seq_len):
        lo = i * seq_len
        x = np.array(stream[lo:lo + seq_len])
        y = np.array(stream[lo + 1:lo + seq_len + 1])
        y[np.array(is_eos[lo:lo + seq_len])] = IGNORE_INDEX
        cu = [0] + [p for p in range(1, seq_len) if is_start[lo + p]] + [seq_len]
        windows.append((x, y, np.array(cu)))
    return stream, windows


AWKWARD = [1, 15, 16, 17, 55, 1, 1, 2, 16, 31, 3, 0, 40, 1]  # seq_len 16: L-1, L, L+1, 3L+7, tiny and empty


@pytest.mark.parametrize("seq_len", [1, 2, 16])
def test_packing_matches_brute_force(seq_len):
    docs = random_docs(AWKWARD)
    ds = PackedSequences(ArrayDocuments(docs), seq_len)
    stream, windows = brute_force(docs, seq_len)
    assert len(ds) == len(windows) > 0
    rebuilt = []
    for i, (x, y, cu) in enumerate(windows):
        gx, gy, gcu = ds[i]
        assert gx.dtype == gy.dtype == np.int64 and gcu.dtype == np.int32
        assert gx.shape == gy.shape == (seq_len,)
        np.testing.assert_array_equal(gx, x)
        np.testing.assert_array_equal(gy, y)
        np.testing.assert_array_equal(gcu, cu)
        rebuilt += list(gx)
    assert rebuilt == stream[:len(rebuilt)]
    assert len(stream) - len(rebuilt) <= seq_len  # only the tail that fills no whole window is dropped
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_packing_token_file_and_synthetic_agree_with_brute_force(tmp_path):
    lengths = synthetic_lengths(3000, "lognormal", seed=3, mean_len=50, sigma=1.5)
    synth = SyntheticDocuments(lengths, seed=3)
    docs = [synth.doc(i) for i in range(synth.num_docs)]
    np.testing.assert_array_equal(synth.doc(5), SyntheticDocuments(lengths, seed=3).doc(5))
    assert all(d.max() < 256 for d in docs if len(d))
    _, windows = brute_force(docs, 64)
    # a token file written by hand, in the documented format
    (tmp_path / "tokens.bin").write_bytes(np.concatenate(docs).astype(np.uint16).tobytes())
    np.save(tmp_path / "index.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    (tmp_path / "meta.json").write_text(json.dumps({"format": "seqpar-tokens", "version": 1, "vocab_size": 257,
                                                    "n_docs": len(docs), "n_tokens": int(lengths.sum())}))
    for ds in (PackedSequences(synth, 64), PackedSequences(TokenFile(tmp_path), 64)):
        assert len(ds) == len(windows)
        for i in (0, 7, len(ds) - 1):
            for got, want in zip(ds[i], windows[i]):
                np.testing.assert_array_equal(got, want)


def make_dataset(n_docs=300, seq_len=32, seed=1):
    lengths = np.random.default_rng(seed).integers(1, 3 * seq_len, size=n_docs)
    return PackedSequences(ArrayDocuments(random_docs(lengths, seed)), seq_len)


def take(loader, steps):
    return [loader.next_batch() for _ in range(steps)]


def flat_rows(batch, seq_len):
    return [row for mb in batch for row in mb.input_ids[0].reshape(-1, seq_len)]


def test_loader_micro_batches_are_concatenated_windows():
    ds = make_dataset()
    loader = PackedLoader(ds, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=2, seed=5)
    indices = loader.global_indices(0)[:4]
    batch = loader.next_batch()
    assert len(batch) == 2
    for m, mb in enumerate(batch):
        assert mb.input_ids.shape == mb.targets.shape == (1, 2 * ds.seq_len)
        assert mb.input_ids.dtype == mb.targets.dtype == torch.int64 and mb.cu_seqlens.dtype == torch.int32
        expected_cu = [0]
        for k, idx in enumerate(indices[2 * m:2 * m + 2]):
            x, y, cu = ds[int(idx)]
            np.testing.assert_array_equal(mb.input_ids[0, k * ds.seq_len:(k + 1) * ds.seq_len].numpy(), x)
            np.testing.assert_array_equal(mb.targets[0, k * ds.seq_len:(k + 1) * ds.seq_len].numpy(), y)
            expected_cu += list(cu[1:] + k * ds.seq_len)
        assert mb.cu_seqlens.tolist() == expected_cu
        assert (torch.diff(mb.cu_seqlens) > 0).all()  # no duplicated boundary at the seam


def test_loader_dp_shards_partition_the_global_batch_and_epochs_wrap():
    ds = make_dataset()
    steps = len(ds) // 12 + 3  # crosses an epoch boundary mid-batch
    whole = take(PackedLoader(ds, global_batch_size=12, micro_batch_size=3, dp_rank=0, dp_size=1, seed=7), steps)
    shards = [take(PackedLoader(ds, global_batch_size=12, micro_batch_size=2, dp_rank=r, dp_size=3, seed=7), steps)
              for r in range(3)]
    for s in range(steps):
        rows = [flat_rows(shards[r][s], ds.seq_len) for r in range(3)]
        assert sum(len(r) for r in rows) == 12
        assert torch.equal(torch.stack([x for r in rows for x in r]), torch.stack(flat_rows(whole[s], ds.seq_len)))
    loader = PackedLoader(ds, global_batch_size=12, micro_batch_size=3, dp_rank=0, dp_size=1, seed=7)
    seen = np.concatenate([loader.global_indices(s) for s in range(steps)])
    n = len(ds)
    assert sorted(seen[:n]) == list(range(n))  # every window once per epoch
    assert len(set(seen[n:2 * n])) == len(seen[n:2 * n])
    again = PackedLoader(ds, global_batch_size=12, micro_batch_size=3, dp_rank=0, dp_size=1, seed=7)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(take(again, 2)[1], whole[1]))
    other_seed = PackedLoader(ds, global_batch_size=12, micro_batch_size=3, dp_rank=0, dp_size=1, seed=8)
    assert not np.array_equal(other_seed.global_indices(0), loader.global_indices(0))


def test_loader_read_as_rank_and_peek():
    ds = make_dataset()
    kwargs = dict(global_batch_size=8, micro_batch_size=2, dp_size=2, seed=3)
    own = [take(PackedLoader(ds, dp_rank=r, **kwargs), 3) for r in range(2)]
    as_one = [take(PackedLoader(ds, dp_rank=r, read_as_rank=1, **kwargs), 3) for r in range(2)]
    for s in range(3):
        for r in range(2):
            assert torch.equal(torch.stack(flat_rows(as_one[r][s], ds.seq_len)), torch.stack(flat_rows(own[1][s], ds.seq_len)))
    assert not torch.equal(torch.stack(flat_rows(own[0][0], ds.seq_len)), torch.stack(flat_rows(own[1][0], ds.seq_len)))
    peeked = PackedLoader(ds, dp_rank=0, **kwargs)
    for s in range(3):  # peek: any rank's next micro-batches, not taken
        ahead = [flat_rows(peeked.peek(r), ds.seq_len) for r in (None, 0, 1)]
        taken = flat_rows(peeked.next_batch(), ds.seq_len)
        assert torch.equal(torch.stack(ahead[0]), torch.stack(taken)) and torch.equal(torch.stack(ahead[1]), torch.stack(taken))
        assert torch.equal(torch.stack(ahead[2]), torch.stack(flat_rows(own[1][s], ds.seq_len)))
    assert torch.equal(torch.stack(flat_rows(PackedLoader(ds, dp_rank=0, read_as_rank=1, **kwargs).peek(0), ds.seq_len)),
                       torch.stack(flat_rows(own[1][0], ds.seq_len)))
    with pytest.raises(ValueError, match="read_as_rank=2 out of range"):
        PackedLoader(ds, dp_rank=0, read_as_rank=2, **kwargs)


def test_loader_resume_continues_exactly():
    ds = make_dataset()
    kwargs = dict(global_batch_size=8, micro_batch_size=2, seed=3)
    straight = PackedLoader(ds, dp_rank=1, dp_size=2, **kwargs)
    take(straight, 5)
    state = json.loads(json.dumps(straight.state_dict()))  # plain values, as a checkpoint stores them
    expected = take(straight, 40)
    resumed = PackedLoader(ds, dp_rank=1, dp_size=2, **kwargs)
    resumed.load_state_dict(state)
    for a, b in zip(take(resumed, 40), expected):
        for ma, mb in zip(a, b):
            assert torch.equal(ma.input_ids, mb.input_ids) and torch.equal(ma.cu_seqlens, mb.cu_seqlens)
    # another dp size resumes on the same global batches
    single = PackedLoader(ds, dp_rank=0, dp_size=1, **kwargs)
    single.load_state_dict(state)
    assert torch.equal(torch.stack(flat_rows(single.next_batch(), ds.seq_len)[4:]),
                       torch.stack(flat_rows(expected[0], ds.seq_len)))
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(ds, dp_rank=0, dp_size=1, global_batch_size=8, micro_batch_size=2, seed=4).load_state_dict(state)


def test_loader_rejects_bad_batch_sizes():
    ds = make_dataset()
    with pytest.raises(ValueError, match=r"train\.global_batch_size=12.*train\.micro_batch_size=4.*dp=2"):
        PackedLoader(ds, global_batch_size=12, micro_batch_size=4, dp_rank=0, dp_size=2, seed=0)
    small = make_dataset(n_docs=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader(small, global_batch_size=len(small) + 1, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)


def test_prepare_cli_round_trip(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first document ✓\n")
    (tmp_path / "b.md").write_text("# second\n")
    records = [{"text": "third"}, {"text": ""}, {"body": "x", "text": "fourth\nline"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "fifth"}) + "\n")
    out = tmp_path / "ds"
    prepare_main([str(tmp_path / n) for n in ("a.txt", "b.md", "c.jsonl")] + ["--out", str(out)])
    assert "4 documents" in capsys.readouterr().out
    tf = TokenFile(out)
    assert [decode(tf.doc(i)) for i in range(tf.num_docs)] == ["first document ✓\n", "# second\n", "third",
                                                             "fourth\nline"]
    assert isinstance(tf.tokens, np.memmap)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == VOCAB_SIZE and meta["n_docs"] == 4 and meta["n_tokens"] == tf.num_tokens
    index = np.load(out / "index.npy")
    assert index[0] == 0 and index[-1] == (out / "tokens.bin").stat().st_size // 2

    prepare([tmp_path / "d.jsonl"], tmp_path / "ds2", text_key="content")
    assert decode(TokenFile(tmp_path / "ds2").doc(0)) == "fifth"
    ds = build_dataset(SimpleNamespace(name="token_file", path=str(out)), 8)
    assert decode(np.concatenate([ds[i][0] for i in range(len(ds))])).startswith("first document ✓\n# second")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare([tmp_path / "a.txt"], out)
    prepare([tmp_path / "a.txt"], out, overwrite=True)
    assert TokenFile(out).num_docs == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_prepare_is_atomic_and_errors_are_clear(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "ok"}) + "\n" + "{not json\n")
    out = tmp_path / "ds"
    with pytest.raises(ValueError, match=r"good\.jsonl:2: not valid JSON"):
        prepare([good], out)
    assert list(tmp_path.iterdir()) == [good]  # neither the dataset nor its temporary directory
    (tmp_path / "keyed.jsonl").write_text('{"t": "a"}\n')
    with pytest.raises(ValueError, match=r"keyed\.jsonl:1: no string field 'text'.*--text-key"):
        prepare([tmp_path / "keyed.jsonl"], out)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare([tmp_path / "missing.txt"], out)
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"table\.csv: unsupported"):
        prepare([tmp_path / "table.csv"], out)
    with pytest.raises(SystemExit):
        prepare_main([str(tmp_path / "missing.txt"), "--out", str(out)])
    assert not out.exists()
    # a failed --overwrite keeps the old dataset whole
    (tmp_path / "doc.txt").write_text("kept")
    prepare([tmp_path / "doc.txt"], out)
    with pytest.raises(ValueError):
        prepare([tmp_path / "doc.txt", good], out, overwrite=True)
    assert decode(TokenFile(out).doc(0)) == "kept" and TokenFile(out).num_docs == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_token_file_errors_name_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*seqpar\.data\.prepare.*--out"):
        TokenFile(tmp_path / "nowhere")
    (tmp_path / "doc.txt").write_text("hello world")
    out = prepare([tmp_path / "doc.txt"], tmp_path / "ds")
    (out / "tokens.bin").write_bytes((out / "tokens.bin").read_bytes()[:-4])  # truncated
    with pytest.raises(ValueError, match=r"ds.*index\.npy spans.*--out"):
        TokenFile(out)
    (out / "index.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.npy: missing"):
        TokenFile(out)


def test_synthetic_lengths():
    for dist in ("fixed", "uniform", "lognormal"):
        a = synthetic_lengths(200_000, dist, seed=1, mean_len=500, sigma=0.8)
        assert a.dtype == np.int64 and a.min() >= 1
        assert a.sum() >= 200_000 and a[:-1].sum() < 200_000  # the shortest prefix that covers num_tokens
        np.testing.assert_array_equal(a, synthetic_lengths(200_000, dist, seed=1, mean_len=500, sigma=0.8))
        assert abs(a.mean() / 500 - 1) < 0.15, (dist, a.mean())
    assert not np.array_equal(synthetic_lengths(10_000, "lognormal", seed=1, mean_len=100),
                              synthetic_lengths(10_000, "lognormal", seed=2, mean_len=100))
    assert synthetic_lengths(100_000, "lognormal", seed=0, mean_len=1000, max_len=1200).max() <= 1200
    with pytest.raises(ValueError, match="data.distribution='zipf'"):
        synthetic_lengths(100, "zipf", seed=0)


def test_synthetic_lengths_from_shared_file():
    path = SHARED_LENGTHS / "prolong.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    pool = np.array(json.loads(path.read_text()))
    a = synthetic_lengths(5_000_000, "file", seed=0, lengths_file=path)
    assert set(np.unique(a)) <= set(np.unique(pool))
    np.testing.assert_array_equal(a, synthetic_lengths(5_000_000, "file", seed=0, lengths_file=str(path)))
    assert a.sum() >= 5_000_000
    ds = build_dataset(SimpleNamespace(name="synthetic", num_tokens=1 << 20, distribution="file", mean_len=1,
                                       sigma=1.0, max_len=None, lengths_file=str(path), seed=0), 4096)
    assert len(ds) >= (1 << 20) // 4096


def test_synthetic_lengths_from_the_committed_gzipped_mixes():
    """docs/benchmarks/data's gzipped copies of the mixes (what GPU runs carry) read as the JSON does."""
    committed = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "data"
    for name in ("wlbllm", "prolong"):
        gz = committed / f"{name}.json.gz"
        pool = np.array(json.loads(gzip.decompress(gz.read_bytes())))
        a = synthetic_lengths(1_000_000, "file", seed=1, lengths_file=gz)
        assert set(np.unique(a)) <= set(np.unique(pool)) and a.sum() >= 1_000_000
        if (SHARED_LENGTHS / f"{name}.json").is_file():
            np.testing.assert_array_equal(a, synthetic_lengths(1_000_000, "file", seed=1,
                                                               lengths_file=SHARED_LENGTHS / f"{name}.json"))


def test_embedded_corpus():
    docs = load_embedded_corpus()
    assert len(docs) > 100 and sum(len(d) for d in docs) > 2_000_000
    assert all(d.dtype == np.uint16 for d in docs)
    text = decode(docs[0])
    compile(text, "<corpus>", "exec")  # Python source, intact
    assert load_embedded_corpus()[0] is not docs[0] and np.shares_memory(load_embedded_corpus()[0], docs[0])
    ds = build_dataset(SimpleNamespace(name="embedded"), 256)
    x, y, cu = ds[len(ds) // 2]
    assert cu[0] == 0 and cu[-1] == 256 and x.max() <= EOS_ID


def test_build_dataset_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"data\.name='wiki'.*embedded.*token_file.*synthetic"):
        build_dataset(SimpleNamespace(name="wiki"), 128)
