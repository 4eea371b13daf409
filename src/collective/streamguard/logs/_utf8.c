/* collective.streamguard.logs._utf8: the UTF-8 check of LogFollower, in C.
 *
 * Optional, like zope.interface's and persistent's C optimizations: where
 * it is not built (no compiler, or PURE_PYTHON set at install time)
 * collective.streamguard.logs.follower checks with CPython's decoder instead.
 *
 * Why: every byte @@stream-log sends is checked as UTF-8 first.  CPython's
 * decoder is the only checker in the standard library; it builds text
 * nobody reads and holds the GIL, which on a long catch-up costs about as
 * much CPU as waitress spends sending the file (benchmarks/README.rst).
 * This scan builds nothing, skips ASCII eight bytes at a time and lets the
 * other threads run while it scans a large piece.
 *
 * check(buffer, final) -> (taken, valid): ``taken`` bytes from the start
 * are complete, well-formed UTF-8 sequences (Unicode 15, table 3-7: no
 * overlong forms, no surrogates, nothing above U+10FFFF).  ``valid`` is
 * False when the scan stopped at an ill-formed sequence, which starts at
 * ``taken``; True when it stopped at the end or, unless ``final``, before a
 * sequence cut short by the end.  The same answers as
 * codecs.utf_8_decode(buffer, "strict", final), without the text
 * (tests/test_utf8_check.py compares them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Below this size the scan is too short for releasing the GIL to pay. */
#define RELEASE_GIL_FROM 65536

static Py_ssize_t
scan(const unsigned char *s, Py_ssize_t n, int final, int *valid)
{
    Py_ssize_t i = 0;

    *valid = 1;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            /* ASCII: eight bytes at a time, to the next byte >= 0x80. */
            i++;
            while (i + 8 <= n) {
                uint64_t word;
                memcpy(&word, s + i, 8);
                uint64_t top_bits = word & UINT64_C(0x8080808080808080);
                if (top_bits) {
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
                    /* Straight to the word's first byte >= 0x80. */
                    i += __builtin_ctzll(top_bits) >> 3;
#endif
                    break;
                }
                i += 8;
            }
            continue;
        }
        int follow;
        unsigned char low = 0x80, high = 0xBF; /* the second byte's range */
        if (c >= 0xC2 && c <= 0xDF) {
            follow = 1;
        } else if (c == 0xE0) {
            follow = 2;
            low = 0xA0;
        } else if (c == 0xED) {
            follow = 2;
            high = 0x9F;
        } else if (c >= 0xE1 && c <= 0xEF) {
            follow = 2;
        } else if (c == 0xF0) {
            follow = 3;
            low = 0x90;
        } else if (c == 0xF4) {
            follow = 3;
            high = 0x8F;
        } else if (c >= 0xF1 && c <= 0xF3) {
            follow = 3;
        } else {
            *valid = 0;
            return i;
        }
        if (c == 0xED && !final && n - i == 2 && s[i + 1] >= 0xA0 && s[i + 1] <= 0xBF) {
            /* As CPython: a surrogate's first two bytes at the end are
             * "cut short", not ill-formed, until the data is final. */
            return i;
        }
        Py_ssize_t j = i + 1;
        for (int k = 0; k < follow; k++, j++) {
            if (j >= n) {
                /* Cut short by the end: well formed so far. */
                if (final)
                    *valid = 0;
                return i;
            }
            unsigned char b = s[j];
            if (k == 0 ? (b < low || b > high) : (b < 0x80 || b > 0xBF)) {
                *valid = 0;
                return i;
            }
        }
        i = j;
    }
    return i;
}

static PyObject *
check(PyObject *module, PyObject *args)
{
    Py_buffer view;
    int final;
    int valid;
    Py_ssize_t taken;

    if (!PyArg_ParseTuple(args, "y*p:check", &view, &final))
        return NULL;
    if (view.len >= RELEASE_GIL_FROM) {
        Py_BEGIN_ALLOW_THREADS
        taken = scan((const unsigned char *)view.buf, view.len, final, &valid);
        Py_END_ALLOW_THREADS
    } else {
        taken = scan((const unsigned char *)view.buf, view.len, final, &valid);
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nO)", taken, valid ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"check", check, METH_VARARGS,
     "check(buffer, final) -> (taken, valid): how much of buffer is "
     "complete, well-formed UTF-8, and whether it stopped at an ill-formed "
     "sequence."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot slots[] = {
    {0, NULL},
};

static struct PyModuleDef definition = {
    PyModuleDef_HEAD_INIT,
    "collective.streamguard.logs._utf8",
    "The UTF-8 check of LogFollower, in C (optional).",
    0,
    methods,
    slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__utf8(void)
{
    return PyModuleDef_Init(&definition);
}
