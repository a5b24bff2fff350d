"""The embedded corpus, its split, the BPE tokenizer and the batch order are deterministic."""

import json
import os

import numpy as np
import pytest
import torch

from mpoe.config import DataConfig
from mpoe.train.data import corpus, documents
from mpoe.train.data import sequences as data


def test_corpus_is_deterministic_and_split_disjoint():
    docs = corpus.embedded_documents()
    assert docs == corpus.embedded_documents()
    assert len(docs) > 500 and sum(map(len, docs)) > 500_000  # pydoc topics + stdlib docstrings
    source = documents.DocumentSource([docs])
    train, val = (list(source.documents(split, 0.05)) for split in ("train", "val"))
    assert len(train) + len(val) == len(docs)
    assert not set(train) & set(val)
    assert 0.02 < len(val) / len(docs) < 0.10
    # the split depends on each document alone, not on order
    val_rev = list(documents.DocumentSource([docs[::-1]]).documents("val", 0.05))
    assert set(val_rev) == set(val)


def test_cached_docstrings_equal_a_fresh_parse_and_follow_the_sources(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    doc = "A long docstring. " * 20
    (root / "a.py").write_text(f'"""{doc}"""\n\ndef f():\n    """short"""\n')
    (root / "pkg" / "b.py").write_text(f'class C:\n    """{doc}B"""\n')
    (root / "test" / "t.py").write_text(f'"""{doc}T"""\n')  # a skipped folder
    truth = [doc.strip(), (doc + "B").strip()]
    cache = tmp_path / "cache"
    cache.mkdir()
    assert corpus.stdlib_docstrings(str(root)) == truth
    assert corpus.stdlib_docstrings(str(root), cache_dir=cache) == truth  # written
    assert len(list(cache.iterdir())) == 1
    assert corpus.stdlib_docstrings(str(root), cache_dir=cache) == truth  # read back
    (root / "pkg" / "b.py").write_text(f'class C:\n    """{doc}Changed"""\n')
    assert corpus.stdlib_docstrings(str(root), cache_dir=cache) == [doc.strip(), (doc + "Changed").strip()]


def test_bpe_training_is_deterministic():
    docs = corpus.pydoc_topics()[:80]
    a = data.train_tokenizer(docs, 600)
    b = data.train_tokenizer(docs, 600)
    assert a.get_vocab() == b.get_vocab()
    text = "The assert statement is a convenient way to insert debugging assertions."
    assert a.encode(text).ids == b.encode(text).ids
    assert a.decode(a.encode(text).ids) == text


def test_prepare_caches_and_reproduces(tmp_path):
    cfg = DataConfig(name="text", paths=[], cache_dir=str(tmp_path))
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus.pydoc_topics()[:60]))
    cfg.paths = [str(path)]
    cfg.vocab_size = 500
    first = data.prepare(cfg)
    second = data.prepare(cfg)  # from the cache
    assert (first.train == second.train).all() and (first.val == second.val).all()
    assert first.vocab_size == 500
    assert len(list(tmp_path.glob("bpe-*.json"))) == 1


def test_encode_gives_each_documents_ids_then_end_of_text():
    docs = corpus.pydoc_topics()[:23]
    tok = data.train_tokenizer(docs, 600)
    eot = data.special_ids(tok)[0]
    truth = [i for d in docs for i in tok.encode(d).ids + [eot]]
    stream = data.encode(tok, docs)
    assert stream.dtype == np.int32 and stream.tolist() == truth
    assert data.encode(tok, []).tolist() == []


def test_token_cache_is_memory_mapped_and_packing_copies_nothing(tmp_path, monkeypatch):
    """Every process maps the cached int32 tokens (one copy per node, in the page cache); sequences are views
    of the map, and only a drawn batch becomes int64."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus.pydoc_topics()[:60]))
    cfg = DataConfig(name="text", paths=[str(path)], cache_dir=str(tmp_path), vocab_size=500)
    first = data.prepare(cfg)
    monkeypatch.setattr(data, "encode", lambda *a: pytest.fail("the cached tokens were encoded again"))
    cached = data.prepare(cfg)
    for split in ("train", "val"):
        array = getattr(cached, split)
        assert isinstance(array, np.memmap) and array.dtype == np.int32
        assert np.array_equal(array, getattr(first, split))
    sequences = data.pack(cached.train, 17)
    assert sequences.data_ptr() == cached.train.ctypes.data  # a view of the map: no copy
    assert torch.equal(sequences[1], torch.from_numpy(np.asarray(cached.train[17:34])))
    batch = data.SequenceSampler(sequences, micro_batch=2, accum=1, world=1, rank=0, seed=0).batch(0, 0)
    assert batch.dtype == torch.int64 and batch.shape == (2, 17)
    ((val_batch, count),) = data.eval_batches(data.pack(cached.val, 17), 64, 64, 1, 0)[:1]
    assert val_batch.dtype == torch.int64 and count == len(val_batch)


def test_an_interrupted_tokenization_leaves_no_partial_cache(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus.pydoc_topics()[:60]))
    cfg = DataConfig(name="text", paths=[str(path)], cache_dir=str(tmp_path / "cache"), vocab_size=500)
    monkeypatch.setattr(documents, "BATCH_DOCS", 16)
    real_encode, calls = data.encode, []

    def interrupted_after_two_batches(tokenizer, docs):
        calls.append(len(docs))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(tokenizer, docs)

    monkeypatch.setattr(data, "encode", interrupted_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(cfg)
    assert not list((tmp_path / "cache").glob("tokens-*")), "a partial token file was left"
    monkeypatch.setattr(data, "encode", real_encode)
    assert len(data.prepare(cfg).train) > 0  # the next run builds the cache whole


def test_sampler_slices_ranks_disjointly_and_repeats_per_step():
    sequences = torch.arange(64 * 4).view(64, 4)
    per_rank = [data.SequenceSampler(sequences, micro_batch=2, accum=2, world=2, rank=r, seed=3) for r in range(2)]
    seen = torch.cat([s.batch(5, m) for s in per_rank for m in range(2)])
    assert len(set(seen[:, 0].tolist())) == 8  # 2 ranks x 2 micro x 2 sequences, all different
    assert torch.equal(per_rank[0].batch(5, 1), per_rank[0].batch(5, 1))
    fresh = data.SequenceSampler(sequences, 2, 2, 2, 0, seed=3)
    assert torch.equal(fresh.batch(5, 1), per_rank[0].batch(5, 1))  # a pure function of the step: exact resume


def test_json_and_parquet_files_read_through_datasets(tmp_path):
    import datasets

    docs = corpus.pydoc_topics()[:120]
    datasets.Dataset.from_dict({"body": docs}).to_json(str(tmp_path / "docs.jsonl"))
    datasets.Dataset.from_dict({"body": docs}).to_parquet(str(tmp_path / "docs.parquet"))
    loaded = []
    for name in ("docs.jsonl", "docs.parquet"):
        cfg = DataConfig(
            name="text", paths=[str(tmp_path / name)], text_field="body", cache_dir=str(tmp_path / "cache")
        )
        train, val = documents.load_documents(cfg)
        loaded.append(sorted(train + val))
    assert loaded[0] == loaded[1] == sorted(d for d in docs if d.strip())


def test_missing_text_column_is_one_line(tmp_path):
    import datasets
    import pytest

    from mpoe.config import ConfigError

    datasets.Dataset.from_dict({"body": ["some text"] * 4}).to_json(str(tmp_path / "d.jsonl"))
    with pytest.raises(ConfigError, match="data.text_field='text' is not a column"):
        documents.load_documents(DataConfig(name="text", paths=[str(tmp_path / "d.jsonl")]))


def test_an_empty_mpoe_cache_means_the_default_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPOE_CACHE", "")
    assert data.cache_root(DataConfig()) == tmp_path / "home" / ".cache" / "mpoe"
    monkeypatch.setenv("MPOE_CACHE", str(tmp_path / "mine"))
    assert data.cache_root(DataConfig()) == tmp_path / "mine"


def _prepare_on_two_nodes_or_one(rank: int, corpus_path: str, out_dir: str) -> None:
    """Rank 1 is first a second process of rank 0's node (same cache, LOCAL_RANK 1: it must not read the
    documents), then the first process of another node (its own cache directory, LOCAL_RANK 0)."""
    import os

    from mpoe.config import TrainConfig
    from mpoe.train import loop

    def prepared(cache_dir: str):
        cfg = TrainConfig(data=DataConfig(name="text", paths=[corpus_path], cache_dir=cache_dir, vocab_size=500))
        token_data = loop._prepare_data(cfg, rank)
        return {
            "train": np.array(token_data.train),
            "val": np.array(token_data.val),
            "mapped": isinstance(token_data.train, np.memmap) and isinstance(token_data.val, np.memmap),
            "ids": token_data.tokenizer.encode("The assert statement").ids,
            "special": (token_data.vocab_size, token_data.eot_id, token_data.pad_id),
        }

    real_source = documents.document_source
    if rank == 1:
        documents.document_source = lambda cfg: pytest.fail("a node's second process read the documents")
    same_node = prepared(f"{out_dir}/node0")
    documents.document_source = real_source
    os.environ["LOCAL_RANK"] = "0"
    other_node = prepared(f"{out_dir}/node{rank}")
    torch.save({"same_node": same_node, "other_node": other_node}, f"{out_dir}/{rank}.pt")


@pytest.mark.slow
def test_a_nodes_other_processes_map_its_cache_without_reading_documents(tmp_path):
    from mpoe.parallel.local_world import spawn_world

    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus.pydoc_topics()[:60]))
    spawn_world(_prepare_on_two_nodes_or_one, 2, str(path), str(tmp_path))
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(2)]
    reference = results[0]["same_node"]
    assert reference["mapped"] and len(reference["train"]) > 1000
    for got in (results[1]["same_node"], results[1]["other_node"], results[0]["other_node"]):
        assert got["mapped"] and got["ids"] == reference["ids"] and got["special"] == reference["special"]
        assert np.array_equal(got["train"], reference["train"]) and np.array_equal(got["val"], reference["val"])
    assert sorted(p.name for p in (tmp_path / "node1").iterdir()) == sorted(
        p.name for p in (tmp_path / "node0").iterdir()
    )  # the other node built the same files under the same names


def _prepare_slowly(rank: int, corpus_path: str, out_dir: str, seconds: float) -> None:
    """The first process prepares the data for longer than the world's collectives may wait."""
    import time

    from mpoe.config import TrainConfig
    from mpoe.train import loop

    real_prepare = loop.data_lib.prepare
    loop.data_lib.prepare = lambda cfg: time.sleep(seconds) or real_prepare(cfg)
    cfg = TrainConfig(data=DataConfig(name="text", paths=[corpus_path], cache_dir=out_dir, vocab_size=500))
    torch.save(np.array(loop._prepare_data(cfg, rank).train), f"{out_dir}/{rank}.pt")


@pytest.mark.slow
def test_a_nodes_other_processes_wait_for_its_data_longer_than_the_worlds_timeout(tmp_path):
    """Tokenizing a large corpus takes longer than a collective may (NCCL's watchdog aborts the waiting ranks):
    the wait is a host agreement over the gloo host group, whose timeout allows for it."""
    from mpoe.parallel.local_world import spawn_world

    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus.pydoc_topics()[:50]))
    spawn_world(_prepare_slowly, 2, str(path), str(tmp_path), 20.0, timeout_s=8)
    first, other = (torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(2))
    assert len(first) > 100 and np.array_equal(first, other)


def test_the_tokenizers_thread_pool_is_on_only_while_data_is_prepared(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # as the entry points set it
    seen = []
    real = data.train_tokenizer
    spy = lambda *a: seen.append(os.environ["TOKENIZERS_PARALLELISM"]) or real(*a)
    monkeypatch.setattr(data, "train_tokenizer", spy)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus.pydoc_topics()[:50]))
    data.prepare(DataConfig(name="text", paths=[str(path)], cache_dir=str(tmp_path), vocab_size=500))
    assert seen == ["true"] and os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_prepare_reads_files_a_batch_at_a_time_and_gives_the_per_document_tokens(tmp_path, monkeypatch):
    """The cached streams are each split's documents (the whole list split by `corpus.is_validation`),
    each encoded alone and followed by end-of-text, in file order; the files' Arrow tables are never turned into
    one Python list (no `table[column]`), and batches of 7 documents give the same tokens."""
    import datasets

    docs = corpus.pydoc_topics()[:150]
    half = len(docs) // 2  # both files hold documents (a file without text is refused: issue 31)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs[:half]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs[half:]) + "\n")
    tokenizer_file = tmp_path / "tok.json"
    data.train_tokenizer(docs, 700).save(str(tokenizer_file))
    cfg = DataConfig(
        name="text",
        paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
        text_field="body",
        tokenizer=str(tokenizer_file),
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.2,
    )
    real_getitem = datasets.Dataset.__getitem__

    def no_whole_columns(self, key):
        assert not isinstance(key, str), f"the whole column {key!r} was read into a list"
        return real_getitem(self, key)

    monkeypatch.setattr(datasets.Dataset, "__getitem__", no_whole_columns)
    monkeypatch.setattr(documents, "BATCH_DOCS", 7)
    prepared = data.prepare(cfg)
    tok = prepared.tokenizer
    for split in ("train", "val"):
        truth_docs = [d for d in docs if corpus.is_validation(d, 0.2) == (split == "val")]
        truth = [i for d in truth_docs for i in tok.encode(d).ids + [prepared.eot_id]]
        assert np.asarray(getattr(prepared, split)).tolist() == truth, split


def test_a_split_shorter_than_one_window_names_the_window_and_the_fix():
    from mpoe.config import ConfigError

    assert data.pack(np.arange(10, dtype=np.int32), 5).shape == (2, 5)
    with pytest.raises(ConfigError, match="a window of 129 tokens .* the 100 tokens .* lower trainer.seq_len"):
        data.pack(np.arange(100, dtype=np.int32), 129)
