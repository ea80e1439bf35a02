/* peftkit's native low-rank update for decoding on CPU (built on first use by peftkit/ops/native.py).
 *
 *   out[n, o] += sum_j (sum_i x[n, i] * A[j, i]) * bts[j, o]        n < rows, i < in, j < r, o < n_out
 *
 * x: (rows, in), A: (r, in), bts: (r, n_out) = scaling * B.T, out: (rows, n_out); float32, row-major, contiguous.
 * One call replaces the three torch ops of the same update (x @ A.T, @ bts, add_) and their two temporaries:
 * at decode shapes those ops cost far more in dispatch, allocation and cold-cache misses than their arithmetic.
 * The reference for tests is peftkit.ops.native.add_lowrank_reference_.
 *
 * Python signature: add_lowrank(x_ptr, a_ptr, bts_ptr, out_ptr, rows, in, r, n_out) -> None (addresses as ints;
 * the caller guarantees the shapes, dtype, contiguity and that the memory is on the CPU).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define RANK_BLOCK 64 /* rank rows projected per pass (a stack buffer) */
#define OUT_BLOCK 64  /* output columns accumulated in registers per pass */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PEFTKIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PEFTKIT_CLONES
#endif

PEFTKIT_CLONES
static void lowrank_f32(const float *restrict x, const float *restrict A, const float *restrict bts,
                        float *restrict out, Py_ssize_t rows, Py_ssize_t in, Py_ssize_t r, Py_ssize_t n_out) {
    float z[RANK_BLOCK];
    for (Py_ssize_t n = 0; n < rows; ++n) {
        const float *xn = x + n * in;
        float *on = out + n * n_out;
        for (Py_ssize_t j0 = 0; j0 < r; j0 += RANK_BLOCK) {
            const Py_ssize_t jn = r - j0 < RANK_BLOCK ? r - j0 : RANK_BLOCK;
            Py_ssize_t j = 0;
            for (; j + 4 <= jn; j += 4) { /* four rows of A per pass over x */
                const float *a0 = A + (j0 + j) * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
                float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                for (Py_ssize_t i = 0; i < in; ++i) {
                    const float xv = xn[i];
                    s0 += xv * a0[i];
                    s1 += xv * a1[i];
                    s2 += xv * a2[i];
                    s3 += xv * a3[i];
                }
                z[j] = s0;
                z[j + 1] = s1;
                z[j + 2] = s2;
                z[j + 3] = s3;
            }
            for (; j < jn; ++j) {
                const float *a = A + (j0 + j) * in;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (Py_ssize_t i = 0; i < in; ++i) s += xn[i] * a[i];
                z[j] = s;
            }
            for (Py_ssize_t o0 = 0; o0 < n_out; o0 += OUT_BLOCK) {
                const Py_ssize_t on_ = n_out - o0 < OUT_BLOCK ? n_out - o0 : OUT_BLOCK;
                /* the update is summed on its own and added to out once, as BLAS does (out + delta): adding each
                 * rank term into out would round every partial sum at out's magnitude */
                float acc[OUT_BLOCK] = {0.f};
                for (Py_ssize_t jj = 0; jj < jn; ++jj) {
                    const float *b = bts + (j0 + jj) * n_out + o0;
                    const float zj = z[jj];
#pragma omp simd
                    for (Py_ssize_t o = 0; o < on_; ++o) acc[o] += zj * b[o];
                }
                for (Py_ssize_t o = 0; o < on_; ++o) on[o0 + o] += acc[o];
            }
        }
    }
}

static PyObject *add_lowrank(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "add_lowrank expects 8 arguments (x, A, bts, out addresses; rows, in, r, "
                                      "n_out), got %zd", nargs);
        return NULL;
    }
    void *ptr[4];
    Py_ssize_t size[4];
    for (int k = 0; k < 4; ++k) ptr[k] = PyLong_AsVoidPtr(args[k]);
    for (int k = 0; k < 4; ++k) size[k] = PyLong_AsSsize_t(args[4 + k]);
    if (PyErr_Occurred()) return NULL;
    for (int k = 0; k < 4; ++k) {
        if (size[k] < 0) {
            PyErr_Format(PyExc_ValueError, "add_lowrank: sizes must be >= 0, got %zd", size[k]);
            return NULL;
        }
    }
    for (int k = 0; k < 4; ++k) {
        if (ptr[k] == NULL && size[0] > 0 && size[2] > 0) {
            PyErr_SetString(PyExc_ValueError, "add_lowrank: null address");
            return NULL;
        }
    }
    lowrank_f32((const float *)ptr[0], (const float *)ptr[1], (const float *)ptr[2], (float *)ptr[3], size[0],
                size[1], size[2], size[3]);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_lowrank", (PyCFunction)(void (*)(void))add_lowrank, METH_FASTCALL,
     "add_lowrank(x_ptr, a_ptr, bts_ptr, out_ptr, rows, in, r, n_out): out += (x @ A.T) @ bts in float32"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_peftkit_lowrank", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__peftkit_lowrank(void) { return PyModule_Create(&module); }
