"""GPU decoding, the parts that run anywhere: the segment planner (what goes to the GPU and how it decodes), the
packing of stored frames into pinned slots, and the PTX kernel (assembled by ptxas where the nvcc wheel is
installed). The GPU itself is exercised by tests/test_gpu_upload.py on a machine with a CUDA GPU and nvCOMP.

Planner tests run each plan with a host reference of the GPU's two steps (nvCOMP: decode the planned zstd ranges;
the kernel: join the planes of each job) and compare with the host decoder on real stores of every dtype and encoding.
"""

from __future__ import annotations

import importlib.util
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zstandard

from bundler.store_writer import Weight, write_weight_store
from runtime_shim.gpu import kernel, packing
from runtime_shim.gpu import nvcomp as gpu_decode
from runtime_shim.gpu.planner import ENCODINGS, PTR_SCRATCH, PTR_STAGE, Cut, Cuts, FrameFormatError, plan_frames
from runtime_shim.store.decode import decode_frame_into
from runtime_shim.store.format import PLANE_CHUNK, PLANE_RAW, PLANE_ZSTD, PLANE_ZSTD_CHUNKS, PLANES_TAG, plane_chunks
from runtime_shim.store.reader import WeightReader

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def run_plan_on_host(plan: Cut, stage: np.ndarray, out: np.ndarray) -> None:
    """What nvCOMP and trtx_join_planes do with a plan, in zstandard and numpy (a reference, not a fake GPU):
    ``stage`` holds the segment as copied to the device, ``out`` is the upload's device allocation."""
    dctx = zstandard.ZstdDecompressor()
    scratch = np.zeros(plan.scratch_bytes, dtype=np.uint8)
    for a, size, raw, at, to_dst in zip(
        plan.chunk_in, plan.chunk_size, plan.chunk_raw, plan.chunk_out, plan.chunk_to_dst
    ):
        assert 0 <= a and a + size <= len(stage)
        part = np.frombuffer(dctx.decompress(stage[a : a + size].tobytes(), max_output_size=int(raw)), dtype=np.uint8)
        assert len(part) == raw
        target = out if to_dst else scratch
        assert at + raw <= len(target)
        target[at : at + raw] = part
    for dst, ptrs, kinds, n, es, rot in zip(
        plan.job_out, plan.job_ptr, plan.job_kind, plan.job_n, plan.job_es, plan.job_rot
    ):
        x = np.zeros(n, dtype=np.uint64)
        for k in range(es):
            src = {PTR_STAGE: stage, PTR_SCRATCH: scratch}[int(kinds[k])]
            assert ptrs[k] + n <= len(src)
            x |= src[ptrs[k] : ptrs[k] + n].astype(np.uint64) << np.uint64(8 * k)
        assert (kinds[es:] == 0).all()
        if rot:
            x = (x >> np.uint64(1)) | ((x & np.uint64(1)) << np.uint64(8 * es - 1))
        out[dst : dst + n * es] = np.frombuffer(x.astype(_UINT[int(es)]).astype(f"<u{es}").tobytes(), dtype=np.uint8)


def _weights(rng: np.random.Generator) -> list[Weight]:
    trained_like = (rng.standard_normal(70_000) * 0.02).astype(np.float32)  # exponents cluster as in real weights
    return [
        Weight("w32", "float32", (70_000,), trained_like.tobytes()),
        Weight("w16", "float16", (70_000,), trained_like.astype(np.float16).tobytes()),
        Weight("wbf16", "bfloat16", (70_000,), (trained_like.view(np.uint32) >> 16).astype(np.uint16).tobytes()),
        Weight("w64", "float64", (9_000,), trained_like[:9_000].astype(np.float64).tobytes()),
        Weight("ids", "int64", (5_000,), rng.integers(0, 1000, 5_000).astype(np.int64).tobytes()),
        Weight("q", "int8", (33_333,), rng.integers(-128, 128, 33_333).astype(np.int8).tobytes()),
        Weight("odd", "float16", (3,), np.array([1.5, -2.0, 0.0], dtype=np.float16).tobytes()),
    ]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    root, rng = tmp_path_factory.mktemp("gpu_decode"), np.random.default_rng(7)
    weights = _weights(rng)
    out = {}
    for enc in ("zstd-byteplane", "zstd", "none"):
        for chunk in (4 << 20, 16 << 10):
            d = root / f"{enc}-{chunk}"
            out[f"{enc}-{chunk}"] = (d, write_weight_store(weights, d, encoding=enc, chunk_bytes=chunk, threads=2))
    return out


def _segments(bundle_dir: Path, store, slot_bytes: int) -> tuple[dict, list, np.ndarray, int, object, tuple]:
    """The upload's frame table, its segments with their stored bytes (as the uploader reads them), the expected
    device image, and the whole upload's plan, made from the mapped file."""
    with WeightReader(bundle_dir, store) as reader:
        order = list(range(len(store.blobs)))
        offsets, total = packing.device_layout(reader, order)
        t = packing.frame_table(reader, order, offsets)
        plan = plan_frames(reader.mapped(), t["file"], t["size"], t["raw"], t["es"], t["enc"], t["dst"])
        segments = packing.pack_stored(t, slot_bytes)
        frames = list(zip(t["blob"].tolist(), t["frame"].tolist()))
        bufs = []
        for _lo, _hi, runs in segments:
            buf = np.zeros(slot_bytes, dtype=np.uint8)
            for a, b in runs:
                reader.read_frames(frames[a:b], memoryview(buf)[int(t["slot_off"][a]) :])
            bufs.append(buf)
        want = np.zeros(total, dtype=np.uint8)
        for i in order:
            reader.decode_blob_into(i, memoryview(want)[offsets[i] : offsets[i] + store.blobs[i].nbytes])
    return (
        t,
        list(zip(segments, bufs)),
        want,
        total,
        plan,
        Cuts(plan, [(lo, hi) for lo, hi, _ in segments], t["slot_off"] - t["file"]),
    )


@pytest.mark.parametrize(
    "name",
    ["zstd-byteplane-4194304", "zstd-byteplane-16384", "zstd-4194304", "zstd-16384", "none-4194304", "none-16384"],
)
@pytest.mark.parametrize("slot_frames", [1, 3])
def test_every_segment_planned_and_run_as_the_gpu_would_matches_the_host_decoder(
    stores, name, slot_frames, impl
) -> None:
    # impl: Cuts.cut checks every zstd range with the C helper where it is built, with numpy elsewhere
    bundle_dir, store = stores[name]
    slot_bytes = max(f.size for b in store.blobs for f in b.frames) * slot_frames
    t, segs, want, total, plan, cuts = _segments(bundle_dir, store, slot_bytes)
    out = np.full(total, 0xAB, dtype=np.uint8)  # not zero: every byte of every blob must be written
    assert len(plan.chunk_in) <= t["chunks"].sum() and len(plan.job_out) <= len(
        t["size"]
    )  # the decoder's tables are sized by these
    most_chunks = 0
    for (lo, hi, _runs), buf in segs:
        part = cuts.cut(lo, hi, buf)
        assert set(part.chunk_frame.tolist()) <= set(range(hi - lo))
        most_chunks = max(most_chunks, len(part.chunk_in))
        run_plan_on_host(part, buf, out)
    for i, blob in enumerate(store.blobs):
        start = int(t["dst"][t["blob"].tolist().index(i)])
        assert out[start : start + blob.nbytes].tobytes() == want[start : start + blob.nbytes].tobytes(), (
            f"blob {i} ({blob.encoding}, {blob.element_size})"
        )
    if name.startswith("zstd-byteplane-4"):
        assert most_chunks > len(segs[0][0][2])  # planes cut in several zstd chunks (mode 2) were exercised


def test_a_frame_whose_header_changed_after_planning_is_refused_by_the_cut(stores) -> None:
    bundle_dir, store = stores["zstd-byteplane-4194304"]
    t, segs, _, _, plan, cuts = _segments(bundle_dir, store, max(f.size for b in store.blobs for f in b.frames) * 3)
    (lo, hi, _), buf = next(((seg, buf) for seg, buf in segs if any(t["enc"][seg[0] : seg[1]] == 2)))
    k = lo + int(np.argmax(t["enc"][lo:hi] == 2))  # a byte-plane frame: its plane header is a dependency
    buf = buf.copy()
    buf[t["slot_off"][k] + 5] ^= 1  # a byte of plane 0's stored size
    with pytest.raises(FrameFormatError, match="differs from the one read when the upload was planned") as e:
        cuts.cut(lo, hi, buf)
    assert e.value.frame == k - lo


def _one_frame(stored: bytes, enc: str, es: int, raw: int, dst: int = 0) -> Cut:
    buf = np.frombuffer(stored, dtype=np.uint8)

    def col(v: int) -> np.ndarray:
        return np.array([v], dtype=np.int64)

    plan = plan_frames(buf, col(0), col(len(stored)), col(raw), col(es), col(ENCODINGS[enc]), col(dst))
    return Cuts(plan, [(0, 1)], col(0)).cut(0, 1, buf)


def _layout2_frame(values: np.ndarray, modes: list[int]) -> bytes:
    """A layout-2 frame written by hand with the given plane modes (1: one zstd frame, as bundles before chunking)."""
    es = values.dtype.itemsize
    u = values.view(f"<u{es}")
    rotated = (u << u.dtype.type(1)) | (u >> u.dtype.type(8 * es - 1))
    planes = rotated.view(np.uint8).reshape(-1, es).T
    head, body = [PLANES_TAG], []
    for k, mode in enumerate(modes):
        data = planes[k].tobytes() if mode == PLANE_RAW else zstandard.ZstdCompressor().compress(planes[k].tobytes())
        head.append(struct.pack("<BI", mode, len(data)))
        body.append(data)
    return b"".join(head + body)


def _check_one(stored: bytes, enc: str, es: int, want: bytes) -> Cut:
    plan = _one_frame(stored, enc, es, len(want))
    out = np.zeros(len(want), dtype=np.uint8)
    run_plan_on_host(plan, np.frombuffer(stored, dtype=np.uint8), out)
    assert out.tobytes() == want
    return plan


def test_frames_with_single_frame_zstd_planes_from_older_bundles_decode_on_host_and_on_the_planned_gpu_path() -> None:
    values = (np.random.default_rng(5).standard_normal(100_000) * 0.05).astype(np.float32)
    stored = _layout2_frame(values, [PLANE_RAW, PLANE_RAW, PLANE_ZSTD, PLANE_ZSTD])
    out = np.empty(values.nbytes, dtype=np.uint8)
    decode_frame_into(stored, "zstd-byteplane", 4, memoryview(out))
    assert out.tobytes() == values.tobytes()
    plan = _check_one(stored, "zstd-byteplane", 4, values.tobytes())
    assert len(plan.chunk_in) == 2 and list(plan.job_kind[0][:4]) == [PTR_STAGE, PTR_STAGE, PTR_SCRATCH, PTR_SCRATCH]


def test_layout_1_frames_plan_as_one_zstd_frame_of_planes_joined_without_rotation() -> None:
    values = (np.random.default_rng(3).standard_normal(1000) * 0.1).astype(np.float32)
    planes = np.frombuffer(values.tobytes(), dtype=np.uint8).reshape(-1, 4).T.copy()  # layout 1: plane k = byte k
    plan = _check_one(zstandard.ZstdCompressor().compress(planes.tobytes()), "zstd-byteplane", 4, values.tobytes())
    assert list(plan.job_rot) == [0] and list(plan.job_n) == [1000]


@pytest.mark.parametrize(
    "table, message",
    [
        (
            struct.pack("<II", 1024, 64),
            "expected chunks of at least 65536 bytes",
        ),  # too small: would overflow the arrays
        (struct.pack("<II", PLANE_CHUNK, 3), "3 chunks of 65536 bytes for a plane of 100000"),
        (struct.pack("<II", PLANE_CHUNK, 2), "does not fit"),
        (struct.pack("<IIII", PLANE_CHUNK, 2, 5, 5) + b"x" * 9, "chunks add up to 26 bytes, the plane has 25"),
        (b"\x00" * 5, "shorter than its 8-byte table header"),
    ],
)
def test_a_damaged_chunk_table_is_refused_by_the_host_decoder_and_the_planner_alike(table, message, impl) -> None:
    with pytest.raises(ValueError, match=message):
        plane_chunks(table, 100_000)
    plane = b"\x00" * 100_000  # element size 2: plane 0 raw, plane 1 the damaged chunked one
    stored = PLANES_TAG + struct.pack("<BIBI", PLANE_RAW, len(plane), PLANE_ZSTD_CHUNKS, len(table)) + plane + table
    with pytest.raises(ValueError, match=message):  # in the same words with the C helper and without
        decode_frame_into(stored, "zstd-byteplane", 2, memoryview(bytearray(200_000)))
    with pytest.raises(FrameFormatError, match=message) as e:
        _one_frame(stored, "zstd-byteplane", 2, 200_000)
    assert e.value.frame == 0


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s[:10], "shorter than its plane header"),
        (lambda s: s[:-1], "announced"),
        (lambda s: s + b"x", "after the last plane"),
        (lambda s: s[:4] + b"\x07" + s[5:], "unknown mode 7"),
    ],
)
def test_a_damaged_plane_header_is_refused_naming_its_frame_before_anything_reaches_the_gpu(
    stores, damage, message
) -> None:
    bundle_dir, store = stores["zstd-byteplane-4194304"]
    i = next(k for k, b in enumerate(store.blobs) if b.encoding == "zstd-byteplane" and b.element_size == 4)
    f = store.blobs[i].frames[0]
    with WeightReader(bundle_dir, store) as reader:
        good = bytearray(f.size)
        reader.read_frames([(i, 0)], memoryview(good))
    assert bytes(good[:4]) == PLANES_TAG
    bad = damage(bytes(good))
    with pytest.raises(ValueError, match=message):
        decode_frame_into(bad, "zstd-byteplane", 4, memoryview(bytearray(f.raw_size)))
    # in a segment: a sound frame, then the damaged one
    buf = np.frombuffer(bytes(good) + bad, dtype=np.uint8)

    def col(a: int, b: int) -> np.ndarray:
        return np.array([a, b], dtype=np.int64)

    with pytest.raises(FrameFormatError, match=message) as e:
        plan_frames(
            buf,
            col(0, len(good)),
            col(len(good), len(bad)),
            col(f.raw_size, f.raw_size),
            col(4, 4),
            col(2, 2),
            col(0, f.raw_size),
        )
    assert e.value.frame == 1


def test_a_chunk_table_whose_sizes_do_not_match_the_zstd_frames_is_refused_by_both_decoders(chunked_frame) -> None:
    values, stored, table = chunked_frame
    sub, count = struct.unpack_from("<II", stored, table)
    assert count == 2
    a, b = struct.unpack_from("<II", stored, table + 8)
    assert a != b
    swapped = bytearray(stored)
    struct.pack_into("<II", swapped, table + 8, b, a)  # same total, wrong boundaries: not zstd frames any more
    with pytest.raises((ValueError, zstandard.ZstdError)):  # the reader turns either into an IntegrityError
        decode_frame_into(bytes(swapped), "zstd-byteplane", 4, memoryview(bytearray(values.nbytes)))
    with pytest.raises(
        FrameFormatError, match="does not start with zstd's magic number|decodes to|is not one zstd frame"
    ):
        _one_frame(bytes(swapped), "zstd-byteplane", 4, values.nbytes)
    _check_one(stored, "zstd-byteplane", 4, values.tobytes())  # the sound one plans and decodes


@pytest.mark.parametrize(
    "stored, raw, message",
    [
        (b"", 4, "shorter than the smallest zstd frame"),  # an empty zstd frame
        (b"\x28\xb5\x2f\xfd\x00\x00\x00\x00\x00", 4, "does not say its decoded size"),
        (b"\x00" * 12, 4, "does not start with zstd's magic number"),
    ],
)
def test_chunks_that_are_not_sound_zstd_frames_never_reach_the_gpu(stored, raw, message, impl) -> None:
    with pytest.raises(FrameFormatError, match=message):
        _one_frame(stored, "zstd", 1, raw)


def test_a_frame_of_no_raw_bytes_is_refused() -> None:
    with pytest.raises(FrameFormatError, match="a frame of 0 raw bytes"):
        _one_frame(b"", "none", 1, 0)


def test_pack_keeps_a_segment_within_one_batch_of_decoded_bytes() -> None:
    t = {
        "size": np.array([100, 100, 100, 100], dtype=np.int64),
        "raw": np.array([4 << 20] * 4, dtype=np.int64),
        "file": np.array([8, 108, 208, 308], dtype=np.int64),
    }
    segments = packing.pack_stored(
        t, 16 << 20, raw_cap=8 << 20
    )  # 400 stored bytes would fit one slot; 16 MiB raw would not
    assert [(lo, hi) for lo, hi, _ in segments] == [(0, 2), (2, 4)]


def test_the_planner_refuses_wrong_sizes() -> None:
    with pytest.raises(FrameFormatError, match="stored 3 bytes, expected 4"):
        _one_frame(b"abc", "none", 1, 4)
    with pytest.raises(FrameFormatError, match="not a multiple of the element size 4"):
        _one_frame(zstandard.ZstdCompressor().compress(b"abcdef"), "zstd-byteplane", 4, 6)


@pytest.mark.parametrize("slot_frames", [1, 2, 5])
def test_pack_fills_slots_with_whole_frames_in_order_and_reads_back_to_back_runs(stores, slot_frames) -> None:
    bundle_dir, store = stores["zstd-byteplane-16384"]
    slot = max(f.size for b in store.blobs for f in b.frames) * slot_frames
    t = packing.frame_table(
        _Store(bundle_dir, store), list(range(len(store.blobs))), {i: 0 for i in range(len(store.blobs))}
    )
    segments = packing.pack_stored(t, slot)
    assert [k for lo, hi, _ in segments for k in range(lo, hi)] == list(range(len(t["size"])))
    for lo, hi, runs in segments:
        assert t["slot_off"][lo] == 0 and (t["slot_off"][lo + 1 : hi] == (t["slot_off"] + t["size"])[lo : hi - 1]).all()
        assert t["slot_off"][hi - 1] + t["size"][hi - 1] <= slot
        assert runs[0][0] == lo and runs[-1][1] == hi and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        for a, b in runs:  # one read each: back to back in the file, and at most READ_RUN unless a single frame
            assert (t["file"][a + 1 : b] == (t["file"] + t["size"])[a : b - 1]).all()
            assert b - a == 1 or t["size"][a:b].sum() <= packing.READ_RUN
    if slot_frames > 1:
        assert len(segments) < len(t["size"])


class _Store:
    """Just enough of a WeightReader for _frame_table."""

    def __init__(self, bundle_dir: Path, store) -> None:
        self.store = store


def _ptxas() -> str | None:
    """ptxas on PATH, or the one the nvidia-cuda-nvcc wheel installs (the test extra)."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    except (ImportError, ValueError):
        spec = None
    wheel = [Path(p, "bin", "ptxas") for p in (spec.submodule_search_locations or [])] if spec else []
    return shutil.which("ptxas") or next((str(p) for p in wheel if p.is_file()), None)


PTXAS = _ptxas()


@pytest.mark.skipif(
    PTXAS is None, reason="ptxas not found (pip install nvidia-cuda-nvcc-cu12 puts it in site-packages)"
)
@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_86", "sm_89", "sm_120"])
def test_the_plane_kernel_assembles_for_every_architecture_trt_rtx_supports(tmp_path, arch) -> None:
    (tmp_path / "k.ptx").write_text(kernel.PTX)
    run = subprocess.run(
        [str(PTXAS), f"-arch={arch}", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 0


def test_without_nvcomp_gpu_decoding_says_why_and_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(gpu_decode, "find_nvcomp", lambda: None)
    with pytest.raises(gpu_decode.MachineError, match="nvCOMP is not installed") as e:
        gpu_decode.Nvcomp()
    assert "nvidia-libnvcomp" in e.value.hint
    assert gpu_decode.available() in ("nvCOMP is not installed", "cuda-python is not installed")


def test_a_library_that_is_not_nvcomp_is_refused_with_its_path(tmp_path) -> None:
    fake = tmp_path / "libnvcomp.so"
    fake.write_bytes(b"not an ELF file")
    with pytest.raises(gpu_decode.MachineError, match=f"cannot load nvCOMP from {fake}"):
        gpu_decode.Nvcomp(str(fake))


def test_a_chunk_damaged_after_planning_is_refused_in_the_bytes_that_go_to_the_gpu(stores) -> None:
    # zstd chunk headers are not part of the plan: they are checked when the plan is cut, in the segment as read
    bundle_dir, store = stores["zstd-byteplane-4194304"]
    t, segs, _, _, plan, cuts = _segments(bundle_dir, store, max(f.size for b in store.blobs for f in b.frames) * 3)
    (lo, hi, _), buf = next((seg, buf) for seg, buf in segs if len(cuts.cut(seg[0], seg[1], buf).chunk_in))
    part = cuts.cut(lo, hi, buf)
    k = int(np.argmax(part.chunk_size))  # the biggest chunk of the segment
    bad = buf.copy()
    bad[part.chunk_in[k]] ^= 0xFF  # its first magic byte
    with pytest.raises(FrameFormatError, match="does not start with zstd's magic number") as e:
        cuts.cut(lo, hi, bad)
    assert e.value.frame == part.chunk_frame[k]


def test_a_whole_zstd_frame_of_many_blocks_plans_as_one_range() -> None:
    # only chunks of chunked planes are held to 64 blocks; a frame of the zstd encoding may have one per 128 KiB
    raw = np.random.default_rng(2).integers(0, 16, 9 << 20, dtype=np.uint8).tobytes()  # 9 MiB: at least 72 blocks
    plan = _check_one(zstandard.ZstdCompressor(level=1).compress(raw), "zstd", 1, raw)
    assert len(plan.chunk_in) == 1
