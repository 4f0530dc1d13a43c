/* The weight store host decoder's hot loops (runtime_shim/store/decode.py): the byte-plane join, in one pass with the
 * GIL released, and the check of a chunked plane's table and zstd headers. The rules are format.py's, in its words;
 * its limits (smallest chunk, most blocks per chunk) come in as arguments, and tests/store_vectors.py checks that
 * this file accepts and refuses what format.py and the GPU planner do.
 *
 * Optional: the shim falls back to numpy when this module was not built (no C compiler at install time), with the
 * same results. numpy needs five passes and temporaries for the same work and holds the GIL between them, which is
 * what kept the host decoder from scaling with threads (bench/README.md, "Decode speed").
 *
 * The store splits each little-endian element, rotated left by one bit (the sign bit becomes bit 0), into one plane
 * per byte (docs/WEIGHT_STORE.md). Rotating back right by one is, byte by byte: byte k of the element is plane k
 * shifted right by one plus the low bit of the next plane on top, and the top byte takes plane 0's low bit. Working
 * on bytes keeps this independent of the host's byte order, and compilers vectorize it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MAX_PLANES 8

#if defined(_MSC_VER) && !defined(__clang__)
#define restrict __restrict /* MSVC's C compiler knows C99's restrict only under its own name */
#endif

static inline void join_rotated(uint8_t *restrict out, const uint8_t *const *planes, Py_ssize_t n, const int es)
{
    const uint8_t *p[MAX_PLANES];
    for (int k = 0; k < es; k++)
        p[k] = planes[k];
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t *o = out + i * es;
        for (int k = 0; k < es - 1; k++)
            o[k] = (uint8_t)((p[k][i] >> 1) | (p[k + 1][i] << 7));
        o[es - 1] = (uint8_t)((p[es - 1][i] >> 1) | (p[0][i] << 7));
    }
}

/* One loop per element size, so each has its inner loop unrolled and vectorized for a constant es. */
static void join2(uint8_t *out, const uint8_t *const *planes, Py_ssize_t n) { join_rotated(out, planes, n, 2); }
static void join4(uint8_t *out, const uint8_t *const *planes, Py_ssize_t n) { join_rotated(out, planes, n, 4); }
static void join8(uint8_t *out, const uint8_t *const *planes, Py_ssize_t n) { join_rotated(out, planes, n, 8); }

PyDoc_STRVAR(join_doc,
"join_rotated(out, planes) -> None\n\n"
"Interleave the byte planes (plane k holds byte k of every element, least significant first) into out and rotate\n"
"each element right by one bit. out: a writable contiguous buffer of len(planes) * n bytes; planes: 2, 4 or 8\n"
"contiguous buffers of n bytes each. Raises ValueError on any other shape.");

static PyObject *py_join_rotated(PyObject *self, PyObject *args)
{
    PyObject *out_obj, *planes_obj;
    if (!PyArg_ParseTuple(args, "OO:join_rotated", &out_obj, &planes_obj))
        return NULL;
    /* a tuple holds its own references: a list could drop a plane while its buffer is being taken */
    PyObject *seq = PySequence_Tuple(planes_obj);
    if (seq == NULL)
        return NULL;
    const Py_ssize_t es = PyTuple_GET_SIZE(seq);
    if (es != 2 && es != 4 && es != 8) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "%zd planes: expected 2, 4 or 8", es);
    }
    Py_buffer out, views[MAX_PLANES];
    Py_ssize_t held = 0;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    const uint8_t *ptrs[MAX_PLANES];
    const Py_ssize_t n = out.len / es;
    if (out.len % es) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes, not a multiple of %zd planes", out.len, es);
        goto done;
    }
    for (; held < es; held++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(seq, held), &views[held], PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        if (views[held].len != n) {
            PyErr_Format(PyExc_ValueError, "plane %zd has %zd bytes, expected %zd", held, views[held].len, n);
            held++;
            goto done;
        }
        ptrs[held] = (const uint8_t *)views[held].buf;
        /* the loop reads planes while it writes out: a plane inside out would be overwritten before it is read */
        const char *lo = (const char *)views[held].buf, *olo = (const char *)out.buf;
        if (n && lo < olo + out.len && olo < lo + n) {
            PyErr_Format(PyExc_ValueError, "plane %zd overlaps out", held);
            held++;
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    if (es == 2)
        join2((uint8_t *)out.buf, ptrs, n);
    else if (es == 4)
        join4((uint8_t *)out.buf, ptrs, n);
    else
        join8((uint8_t *)out.buf, ptrs, n);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    while (held > 0)
        PyBuffer_Release(&views[--held]);
    PyBuffer_Release(&out);
    Py_DECREF(seq);
    return result;
}

static uint64_t le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int k = n - 1; k >= 0; k--)
        v = (v << 8) | p[k];
    return v;
}

/* Check one zstd range of ``size`` bytes at ``h`` that must decode to ``raw`` bytes: a standard frame header with no
 * dictionary that says so and leaves room for a block, and, with ``walk`` (the chunks of chunked planes), a frame of
 * at most ``max_blocks`` blocks whose headers lead exactly to the range's end: the host decodes those chunks as one
 * run of frames, the GPU chunk by chunk, and only then do both read the same bytes. Returns 0, or -1 with a
 * ValueError in format.py's words (format.check_zstd). ``at`` names the range in the message. */
static int check_chunk(const uint8_t *h, uint64_t size, uint64_t raw, int walk, unsigned long long at, int max_blocks)
{
    if (size < 9) {
        PyErr_Format(PyExc_ValueError, "a zstd chunk of %llu bytes is shorter than the smallest zstd frame (9 bytes)",
                     (unsigned long long)size);
        return -1;
    }
    if (le(h, 4) != 0xFD2FB528u) {
        PyErr_Format(PyExc_ValueError, "a zstd chunk at stored offset %llu does not start with zstd's magic number", at);
        return -1;
    }
    const int fhd = h[4], single = (fhd >> 5) & 1, fcs_flag = fhd >> 6;
    if (fhd & 3) {
        PyErr_Format(PyExc_ValueError, "a zstd chunk at stored offset %llu needs a dictionary", at);
        return -1;
    }
    const int fcs_size = fcs_flag == 0 ? single : 1 << fcs_flag;
    if (fcs_size == 0) {
        PyErr_Format(PyExc_ValueError, "a zstd chunk at stored offset %llu does not say its decoded size", at);
        return -1;
    }
    const uint64_t field = 5 + (1 - single);
    if (field + fcs_size + 3 > size) {
        PyErr_Format(PyExc_ValueError, "a zstd chunk of %llu bytes is shorter than its own header", (unsigned long long)size);
        return -1;
    }
    uint64_t value = le(h + field, fcs_size) + (fcs_size == 2 ? 256 : 0);
    if (value > ((uint64_t)1 << 62))
        value = (uint64_t)1 << 62;  /* as the GPU planner caps it */
    if (value != raw) {
        PyErr_Format(PyExc_ValueError, "a zstd chunk at stored offset %llu decodes to %llu bytes, %llu planned", at,
                     (unsigned long long)value, (unsigned long long)raw);
        return -1;
    }
    if (!walk)
        return 0;
    uint64_t b = field + fcs_size;
    int last = 0, blocks = 0;
    while (!last) {
        if (b + 3 > size || ++blocks > max_blocks)
            break;
        const uint64_t bh = le(h + b, 3);
        const int type = (int)((bh >> 1) & 3);
        if (type == 3) /* reserved: never a frame's end, whatever its last-block bit says */
            break;
        last = (int)(bh & 1);
        b += 3 + (type == 1 ? 1 : (bh >> 3));
    }
    if (last)
        b += (fhd >> 2) & 1 ? 4 : 0; /* content checksum */
    if (!last || b != size) {
        PyErr_Format(PyExc_ValueError, "a zstd chunk at stored offset %llu is not one zstd frame of at most %d blocks "
                     "that ends with the chunk's %llu bytes", at, max_blocks, (unsigned long long)size);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(chunk_run_doc,
"chunk_run(data, plane_bytes, min_chunk, max_blocks) -> int\n\n"
"Check a chunked plane (docs/WEIGHT_STORE.md, plane mode 2) before it is decoded as one run of zstd frames: its\n"
"chunk table, and at every chunk's planned offset a zstd frame header with no dictionary that promises the\n"
"chunk's planned size, in a frame of at most max_blocks blocks that ends where the chunk ends. Returns the offset\n"
"of the first chunk in data. Raises ValueError in the words of format.check_chunked_plane.");

/* The same checks as format.check_chunked_plane, without Python objects per chunk. */
static PyObject *py_chunk_run(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t plane_bytes, min_chunk;
    int max_blocks;
    if (!PyArg_ParseTuple(args, "y*nni:chunk_run", &view, &plane_bytes, &min_chunk, &max_blocks))
        return NULL;
    const uint8_t *d = (const uint8_t *)view.buf;
    const Py_ssize_t len = view.len;
    PyObject *result = NULL;
    if (len < 8) {
        PyErr_Format(PyExc_ValueError, "chunked plane of %zd bytes is shorter than its 8-byte table header", len);
        goto done;
    }
    const uint64_t sub = le(d, 4), count = le(d + 4, 4);
    if (sub == 0 || sub < (uint64_t)min_chunk || plane_bytes < 0 || count != ((uint64_t)plane_bytes + sub - 1) / sub) {
        PyErr_Format(PyExc_ValueError, "chunk table says %llu chunks of %llu bytes for a plane of %zd bytes "
                     "(expected chunks of at least %zd bytes covering the plane)",
                     (unsigned long long)count, (unsigned long long)sub, plane_bytes, min_chunk);
        goto done;
    }
    const uint64_t first = 8 + 4 * count;
    if (first > (uint64_t)len) {
        PyErr_Format(PyExc_ValueError, "chunk table of %llu entries does not fit the plane's %zd bytes",
                     (unsigned long long)count, len);
        goto done;
    }
    uint64_t pos = first;
    for (uint64_t c = 0; c < count; c++)
        pos += le(d + 8 + 4 * c, 4);
    if (pos != (uint64_t)len) {
        PyErr_Format(PyExc_ValueError, "chunks add up to %llu bytes, the plane has %zd", (unsigned long long)pos, len);
        goto done;
    }
    pos = first;
    for (uint64_t c = 0; c < count; c++) {
        const uint64_t size = le(d + 8 + 4 * c, 4), raw = c + 1 < count ? sub : (uint64_t)plane_bytes - c * sub;
        if (size > (uint64_t)len - pos) { /* the sizes were summed above; checked again in case the buffer changed */
            PyErr_Format(PyExc_ValueError, "chunks add up to more than the plane's %zd bytes", len);
            goto done;
        }
        const uint8_t *h = d + pos;
        const unsigned long long at = (unsigned long long)pos;
        pos += size;
        if (check_chunk(h, size, raw, 1, at, max_blocks) < 0)
            goto done;
    }
    result = PyLong_FromUnsignedLongLong(first);
done:
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(check_chunks_doc,
"check_chunks(buf, start, size, raw, walk, max_blocks) -> None | (int, str)\n\n"
"The GPU planner's check of every zstd range of a segment (gpu.planner.Cuts.cut) in one call: start, size, raw:\n"
"int64 arrays; walk: a bool array (chunks of chunked planes, whose blocks are walked). None when every range is\n"
"sound, else (index of the first that is not, what is wrong with it). A range outside buf is not sound.");

static PyObject *py_check_chunks(PyObject *self, PyObject *args)
{
    Py_buffer v[5];
    int held = 0;
    PyObject *objs[5], *result = NULL;
    int max_blocks;
    if (!PyArg_ParseTuple(args, "OOOOOi:check_chunks", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &max_blocks))
        return NULL;
    for (; held < 5; held++)
        if (PyObject_GetBuffer(objs[held], &v[held], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
            goto done;
    const Py_ssize_t n = v[1].len / 8;
    for (int k = 1; k < 4; k++)
        if (v[k].itemsize != 8 || v[k].len != n * 8) {
            PyErr_SetString(PyExc_ValueError, "start, size and raw must be int64 arrays of one length");
            goto done;
        }
    if (v[4].itemsize != 1 || v[4].len != n) {
        PyErr_SetString(PyExc_ValueError, "walk must be a bool array as long as start");
        goto done;
    }
    const uint8_t *buf = (const uint8_t *)v[0].buf, *walk = (const uint8_t *)v[4].buf;
    const int64_t *start = (const int64_t *)v[1].buf, *size = (const int64_t *)v[2].buf, *raw = (const int64_t *)v[3].buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (start[i] < 0 || size[i] < 0 || raw[i] < 0 || start[i] > v[0].len || size[i] > v[0].len - start[i]) {
            result = Py_BuildValue("(ns)", i, "a zstd range lies outside the bytes read");
            goto done;
        }
        if (check_chunk(buf + start[i], (uint64_t)size[i], (uint64_t)raw[i], walk[i] != 0, (unsigned long long)start[i], max_blocks) < 0) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyObject *text = value ? PyObject_Str(value) : NULL;
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            if (text != NULL) {
                result = Py_BuildValue("(nO)", i, text);
                Py_DECREF(text);
            }
            goto done;
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    while (held > 0)
        PyBuffer_Release(&v[--held]);
    return result;
}

static PyMethodDef methods[] = {
    {"join_rotated", py_join_rotated, METH_VARARGS, join_doc},
    {"chunk_run", py_chunk_run, METH_VARARGS, chunk_run_doc},
    {"check_chunks", py_check_chunks, METH_VARARGS, check_chunks_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "runtime_shim.store._planes",
    "The weight store host decoder's hot loops: byte-plane join and chunk checks (optional; numpy is the fallback).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
