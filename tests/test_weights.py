"""The weight store: bit-exact round trips per encoding, dedup, framing, determinism, and integrity errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import ml_dtypes
import models
import numpy as np
import pytest

from bundler.onnx_model import load_model, write_raw_layout
from bundler.store_writer import Weight, encode_frame, write_weight_store
from runtime_shim.errors import IntegrityError, ModelError
from runtime_shim.manifest import WEIGHT_ENCODINGS, WeightStore
from runtime_shim.store.reader import MAGIC, WeightReader, decode_frame_into

ENCODINGS = list(WEIGHT_ENCODINGS)


@pytest.fixture(scope="module")
def test_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    src = tmp_path_factory.mktemp("models")
    return {name: load_model(factory(src / name)) for name, factory, _ in models.ALL_BUNDLABLE}


@pytest.fixture(scope="module")
def silero_loaded(silero_models: dict[str, Path]) -> dict:
    return {name: load_model(path) for name, path in silero_models.items()}


def _check_round_trip(weights: list[Weight], bundle: Path, encoding: str, **kw) -> None:
    store = write_weight_store(weights, bundle, encoding=encoding, **kw)
    assert (bundle / store.file.path).stat().st_size == store.file.size
    with WeightReader(bundle, store, verify_raw=True) as reader:
        everything = reader.read_all()
        assert list(everything) == [w.name for w in weights]
        for w in weights:
            got = everything[w.name]
            assert got.tobytes() == bytes(w.data), f"{w.name}: bytes differ after {encoding}"
            if w.dtype not in ("int4", "uint4"):
                assert got.shape == tuple(w.shape)
        one = weights[len(weights) // 2]
        assert reader.read_tensor(one.name).tobytes() == bytes(one.data)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_test_model_round_trips_bit_exact(test_models: dict, tmp_path: Path, encoding: str) -> None:
    for name, model in test_models.items():
        _check_round_trip(model.weights, tmp_path / name, encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_silero_models_round_trip_bit_exact(silero_loaded: dict, tmp_path: Path, encoding: str) -> None:
    for name, model in silero_loaded.items():
        # small frames too, so multi-frame blobs and the in-flight window are exercised on real weights
        _check_round_trip(model.weights, tmp_path / name, encoding, chunk_bytes=64 << 10, threads=2)


def test_unusual_dtypes_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = [
        Weight("bf16", "bfloat16", (4, 5), (rng.standard_normal((4, 5)) * 0.05).astype(ml_dtypes.bfloat16)),
        Weight("f64", "float64", (7,), rng.standard_normal(7)),
        Weight("i4", "int4", (5,), bytes([0x21, 0x43, 0x05])),  # packed: 3 bytes for 5 elements
        Weight("flags", "bool", (3,), np.array([True, False, True])),
        Weight("big_endian", "int32", (3,), np.array([1, 2, 3], dtype=">i4")),
        Weight("empty", "float32", (0, 4), b""),
        Weight("scalar", "int64", (), np.array(7, dtype=np.int64)),
    ]
    store = write_weight_store(weights, tmp_path)
    with WeightReader(tmp_path, store, verify_raw=True) as r:
        assert r.read_tensor("bf16").dtype == ml_dtypes.bfloat16
        assert np.array_equal(r.read_tensor("bf16"), weights[0].data)
        assert r.read_tensor("i4").tobytes() == bytes([0x21, 0x43, 0x05])
        assert r.read_tensor("flags").tolist() == [True, False, True]
        assert r.read_tensor("big_endian").tolist() == [1, 2, 3]  # stored little-endian whatever came in
        assert r.read_tensor("empty").shape == (0, 4)
        assert r.read_tensor("scalar").shape == () and int(r.read_tensor("scalar")) == 7


def test_identical_tensors_are_stored_once(test_models: dict, tmp_path: Path) -> None:
    model = test_models["duplicates"]
    store = write_weight_store(model.weights, tmp_path)
    assert len(store.tensors) == 5 and len(store.blobs) == 3
    assert store.tensor("layer1.weight").blob == store.tensor("layer2.weight").blob
    assert store.tensor("layer1.bias").blob == store.tensor("layer2.bias").blob
    with WeightReader(tmp_path, store) as r:
        both = r.read_all()
    assert np.array_equal(both["layer1.weight"], both["layer2.weight"])
    assert not both["layer1.weight"].flags.writeable  # they share one buffer


def test_same_bytes_other_dtype_is_another_blob(tmp_path: Path) -> None:
    raw = np.arange(8, dtype=np.float32).tobytes()
    store = write_weight_store([Weight("f", "float32", (8,), raw), Weight("i", "int32", (8,), raw)], tmp_path)
    assert len(store.blobs) == 2


def test_frames_respect_chunk_size_and_layout_is_aligned(test_models: dict, tmp_path: Path) -> None:
    model = test_models["mlp"]
    store = write_weight_store(model.weights, tmp_path, chunk_bytes=4002)  # not a multiple of 4: rounded down
    big = store.blobs[store.tensor("fc1.weight").blob]
    assert big.encoding == "zstd-byteplane" and big.element_size == 4
    assert len(big.frames) == -(-big.nbytes // 4000)
    assert all(f.raw_size == 4000 for f in big.frames[:-1])
    assert all(b.raw_offset % store.alignment == 0 for b in store.blobs)
    assert store.raw_size == max(b.raw_offset + b.nbytes for b in store.blobs)
    offsets = [f.offset for b in store.blobs for f in b.frames]
    assert offsets[0] == len(MAGIC) and offsets == sorted(offsets)


def test_incompressible_and_tiny_blobs_are_stored_plain(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    store = write_weight_store(
        [Weight("noise", "uint8", (4096,), noise), Weight("tiny", "float32", (2,), b"\0" * 8)], tmp_path
    )
    assert [b.encoding for b in store.blobs] == ["none", "none"]
    assert all(b.element_size == 1 for b in store.blobs)


def test_store_file_is_content_addressed_and_deterministic(silero_loaded: dict, tmp_path: Path) -> None:
    weights = silero_loaded["silero_vad"].weights
    a = write_weight_store(weights, tmp_path / "a", threads=1, chunk_bytes=32 << 10)
    b = write_weight_store(weights, tmp_path / "b", threads=4, chunk_bytes=32 << 10)
    assert a == b
    data = (tmp_path / "a" / a.file.path).read_bytes()
    assert data == (tmp_path / "b" / b.file.path).read_bytes()
    assert hashlib.sha256(data).hexdigest() == a.file.sha256 and a.file.path == f"weights/{a.file.sha256}.trtxw"
    assert data.startswith(MAGIC)
    assert sorted(p.name for p in (tmp_path / "a" / "weights").iterdir()) == [f"{a.file.sha256}.trtxw"]  # no temp left


def test_index_survives_the_manifest(tmp_path: Path, test_models: dict) -> None:
    store = write_weight_store(test_models["conv"].weights, tmp_path)
    # through the manifest's own parser, with its consistency checks, as the shim reads it
    parsed = WeightStore.parse(store.to_dict(), path="w")
    assert parsed == store


def test_unpack_raw_matches_the_layout_written_from_the_model(test_models: dict, tmp_path: Path) -> None:
    model = test_models["duplicates"]
    store = write_weight_store(model.weights, tmp_path / "bundle")
    with WeightReader(tmp_path / "bundle", store) as r:
        r.unpack_raw(tmp_path / "a.bin")
    write_raw_layout(model, store, tmp_path / "b.bin")
    a = (tmp_path / "a.bin").read_bytes()
    assert a == (tmp_path / "b.bin").read_bytes() and len(a) == store.raw_size
    for t in store.tensors:
        blob = store.blobs[t.blob]
        assert a[blob.raw_offset : blob.raw_offset + blob.nbytes] == bytes(model.weight(t.name).data)


def test_iter_blobs_streams_in_the_order_asked(test_models: dict, tmp_path: Path) -> None:
    store = write_weight_store(test_models["conv"].weights, tmp_path, chunk_bytes=256)
    order = list(reversed(range(len(store.blobs))))
    with WeightReader(tmp_path, store, threads=2, verify_raw=True) as r:
        seen = [(i, hashlib.sha256(buf).hexdigest()) for i, buf in r.iter_blobs(order)]
        assert seen == [(i, store.blobs[i].sha256) for i in order]
        pinned = bytearray(store.blobs[0].nbytes)  # e.g. pinned host memory
        r.decode_blob_into(0, memoryview(pinned))
        assert hashlib.sha256(pinned).hexdigest() == store.blobs[0].sha256
        with pytest.raises(ValueError, match="expected"):
            r.decode_blob_into(0, memoryview(bytearray(3)))


def test_progress_reports_every_raw_byte(test_models: dict, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    write_weight_store(test_models["mlp"].weights, tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] == sum(len(w.data) for w in test_models["mlp"].weights)


def test_frame_codec_functions_are_inverse() -> None:
    raw = (np.random.default_rng(2).standard_normal(1000) * 0.05).astype(np.float32).tobytes()
    for encoding in ENCODINGS:
        out = bytearray(len(raw))
        decode_frame_into(encode_frame(raw, encoding, 4, 3), encoding, 4, memoryview(out))
        assert bytes(out) == raw


def test_writer_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"'w'.*12 bytes, expected 16"):
        write_weight_store([Weight("w", "float32", (4,), b"\0" * 12)], tmp_path)
    with pytest.raises(ModelError, match="repeated"):
        write_weight_store([Weight("w", "uint8", (1,), b"\0"), Weight("w", "uint8", (1,), b"\1")], tmp_path)


# --------------------------------------------------------------------------- integrity
@pytest.fixture
def written(test_models: dict, tmp_path: Path):
    store = write_weight_store(test_models["mlp"].weights, tmp_path, chunk_bytes=4096)
    return tmp_path, store, tmp_path / store.file.path


def test_tampered_frame_names_file_tensor_and_frame(written) -> None:
    bundle, store, path = written
    blob_index = store.tensor("fc1.weight").blob
    frame = store.blobs[blob_index].frames[1]
    data = bytearray(path.read_bytes())
    data[frame.offset + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with WeightReader(bundle, store) as r:
        assert r.read_tensor("fc2.weight") is not None  # other blobs still read
        with pytest.raises(IntegrityError) as e:
            r.read_tensor("fc1.weight")
    msg = str(e.value)
    assert str(path) in msg and "'fc1.weight'" in msg and "frame 1" in msg and frame.digest in msg
    assert e.value.hint


def test_truncated_file_is_refused_on_open(written) -> None:
    bundle, store, path = written
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match=f"{path}.*size .* expected {store.file.size}"):
        WeightReader(bundle, store)


def test_wrong_magic_is_refused(written) -> None:
    bundle, store, path = written
    path.write_bytes(b"NOTTRTXW" + path.read_bytes()[8:])
    with pytest.raises(IntegrityError, match=f"{path}.*magic"):
        WeightReader(bundle, store)


def test_missing_file_is_refused(written) -> None:
    bundle, store, path = written
    path.unlink()
    with pytest.raises(IntegrityError, match=f"{path}.*missing"):
        WeightReader(bundle, store)


def test_unpack_raw_leaves_nothing_behind_on_corruption(written) -> None:
    bundle, store, path = written
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    target = bundle / "out" / "weights.bin"
    target.parent.mkdir()
    with WeightReader(bundle, store) as r, pytest.raises(IntegrityError):
        r.unpack_raw(target)
    assert list(target.parent.iterdir()) == []


def test_a_model_without_weights_has_an_empty_store(tmp_path: Path) -> None:
    store = write_weight_store([], tmp_path)
    assert store.blobs == () and store.raw_size == 0 and store.file.size == len(MAGIC)
    with WeightReader(tmp_path, store) as r:
        assert r.read_all() == {}
        r.unpack_raw(tmp_path / "weights.bin")
    assert (tmp_path / "weights.bin").read_bytes() == b""


def _many_blobs(tmp_path: Path) -> tuple[Path, WeightStore, dict[str, bytes]]:
    """Small tensors (several per task) around a large one of several frames, all distinct."""
    rng = np.random.default_rng(5)
    weights = []
    for k, n in enumerate([300, 5000, 70_000, 200, 1000, 40_000, 9, 120_000, 64, 3000]):
        values = (rng.standard_normal(n) * 0.1).astype(np.float32)
        weights.append(Weight(f"t{k}", "float32", (n,), values.tobytes()))
    store = write_weight_store(weights, tmp_path, chunk_bytes=64 << 10)
    assert max(len(b.frames) for b in store.blobs) > 1
    return tmp_path, store, {w.name: bytes(w.data) for w in weights}


@pytest.mark.parametrize("threads", [1, 3])
def test_iter_blobs_yields_whole_blobs_in_order_with_frames_grouped_into_tasks(
    tmp_path: Path, monkeypatch, threads
) -> None:
    from runtime_shim.store import reader as store_reader

    monkeypatch.setattr(store_reader, "TASK_RAW", 100_000)  # a few small frames per task, big frames alone
    monkeypatch.setattr(store_reader, "TASK_RAW_MIN", 1)
    bundle, store, raw = _many_blobs(tmp_path)
    by_blob = {t.blob: t.name for t in store.tensors}
    order = list(range(len(store.blobs)))[::-1]
    decoded = yielded = peak = 0
    real = WeightReader.decode_frame

    def counting(self, index, j, out):
        nonlocal decoded, peak
        real(self, index, j, out)
        decoded += len(out)
        peak = max(peak, decoded - yielded)

    monkeypatch.setattr(WeightReader, "decode_frame", counting)
    with WeightReader(bundle, store, threads=threads) as reader:
        got = []
        for index, buf in reader.iter_blobs(order):
            assert bytes(buf) == raw[by_blob[index]]
            got.append(index)
            yielded += len(buf)
    assert got == order
    # decoded ahead of the consumer: at most the window of tasks (2 x threads + the one being filled) and the
    # blob being yielded, however many frames that is
    biggest = max(b.nbytes for b in store.blobs)
    assert peak <= (2 * threads + 1) * 100_000 + biggest


def test_a_bad_frame_inside_a_task_of_several_is_named(tmp_path: Path, monkeypatch) -> None:
    from runtime_shim.store import reader as store_reader

    monkeypatch.setattr(store_reader, "TASK_RAW", 1 << 30)  # everything in one task
    bundle, store, _ = _many_blobs(tmp_path)
    victim = 3
    frame = store.blobs[victim].frames[0]
    path = bundle / store.file.path
    data = bytearray(path.read_bytes())
    data[frame.offset + frame.size // 2] ^= 0xFF
    path.write_bytes(data)
    with WeightReader(bundle, store, threads=2) as reader:
        with pytest.raises(IntegrityError, match=rf"blob {victim} \(tensor .*\), frame 0 .*blake3"):
            for _ in reader.iter_blobs():
                pass
