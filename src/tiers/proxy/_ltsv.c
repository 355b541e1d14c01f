/* The access log's LTSV line, made in one C call.
 *
 * The same line as accesslog.format_line (the Python formatter, which the
 * tests hold this one to): labels in a fixed order, tab-separated, newline
 * at the end; None written as "-"; tab, newline, carriage return and
 * backslash in a value escaped as \t, \n, \r and \\; floats with three
 * decimals (printf and Python both round the exact binary value, so they
 * agree).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

enum { F_BYTES, F_INT, F_FLOAT, F_FLOAT_OR_NONE };

#define FIELD(label, kind) {label, sizeof(label) - 1, kind}

/* The fields in argument order, each with the label written before it. */
static const struct {
    const char *label;
    Py_ssize_t label_len;
    int kind;
} fields[] = {
    FIELD("time:", F_BYTES),         FIELD("\thost:", F_BYTES),
    FIELD("\tforwardedfor:", F_BYTES), FIELD("\tmethod:", F_BYTES),
    FIELD("\turi:", F_BYTES),        FIELD("\tprotocol:", F_BYTES),
    FIELD("\tstatus:", F_INT),       FIELD("\tsize:", F_INT),
    FIELD("\treqsize:", F_INT),      FIELD("\treferer:", F_BYTES),
    FIELD("\treqtime:", F_FLOAT),    FIELD("\tapptime:", F_FLOAT_OR_NONE),
    FIELD("\tupstream:", F_BYTES),   FIELD("\tcache:", F_BYTES),
    FIELD("\troute:", F_BYTES),      FIELD("\treqid:", F_BYTES),
    FIELD("\tua:", F_BYTES),
};
#define NFIELDS ((Py_ssize_t)(sizeof(fields) / sizeof(fields[0])))
/* Room for any double with three decimals (DBL_MAX has 309 digits). */
#define NUMBER_MAX 320

/* What a byte becomes in a value: 0 if itself, else the letter after the backslash. */
static unsigned char escape_as[256];

/* The decimal digits of `number` at `out`; returns their count. */
static int
put_decimal(char *out, long long number)
{
    char digits[24];
    int n = 0;
    unsigned long long magnitude = number < 0 ? 0ULL - (unsigned long long)number
                                              : (unsigned long long)number;
    do {
        digits[n++] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude != 0);
    int len = 0;
    if (number < 0) {
        out[len++] = '-';
    }
    while (n > 0) {
        out[len++] = digits[--n];
    }
    return len;
}

/* `seconds` with three decimals at `out` (NUMBER_MAX bytes), as Python's "%.3f"
 * writes it: the exact binary value rounded half to even. Returns the length. */
static int
put_seconds(char *out, double seconds)
{
#if LDBL_MANT_DIG >= 64
    /* The usual case without printf: a double times 1000 needs at most
     * 63 bits of mantissa, so in long double the product is exact, and
     * rintl rounds it half to even (the default rounding mode). */
    if (!signbit(seconds) && seconds < 1e15) {
        long long millis = (long long)rintl((long double)seconds * 1000.0L);
        int len = put_decimal(out, millis / 1000);
        out[len++] = '.';
        int fraction = (int)(millis % 1000);
        out[len++] = (char)('0' + fraction / 100);
        out[len++] = (char)('0' + fraction / 10 % 10);
        out[len++] = (char)('0' + fraction % 10);
        return len;
    }
#endif
    if (isnan(seconds)) {
        return snprintf(out, NUMBER_MAX, "nan"); /* Python: "nan" whatever its sign */
    }
    return snprintf(out, NUMBER_MAX, "%.3f", seconds);
}

PyDoc_STRVAR(format_line_doc,
"format_line(when, host, forwardedfor, method, uri, protocol, status, size, reqsize,\n"
"            referer, reqtime, apptime, upstream, cache, route, reqid, ua)\n"
"--\n\n"
"One access log line, as accesslog.format_line makes it. Text fields are\n"
"bytes or None; status, size and reqsize ints; reqtime a float; apptime a\n"
"float or None.");

static PyObject *
format_line(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != NFIELDS) {
        PyErr_Format(PyExc_TypeError, "format_line takes %zd arguments (%zd given)", NFIELDS,
                     nargs);
        return NULL;
    }
    char numbers[NFIELDS][NUMBER_MAX];
    Py_ssize_t lengths[NFIELDS];
    Py_ssize_t total = 1; /* the newline */
    for (Py_ssize_t i = 0; i < NFIELDS; i++) {
        PyObject *value = args[i];
        total += fields[i].label_len;
        int kind = fields[i].kind;
        if (value == Py_None && (kind == F_BYTES || kind == F_FLOAT_OR_NONE)) {
            lengths[i] = 1;
        } else if (kind == F_BYTES) {
            if (!PyBytes_Check(value)) {
                PyErr_Format(PyExc_TypeError, "format_line: field %s must be bytes or None",
                             fields[i].label + (i > 0));
                return NULL;
            }
            const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(value);
            Py_ssize_t n = PyBytes_GET_SIZE(value);
            Py_ssize_t extra = 0;
            for (Py_ssize_t j = 0; j < n; j++) {
                extra += escape_as[s[j]] != 0;
            }
            lengths[i] = n + extra;
        } else if (kind == F_INT) {
            long long number = PyLong_AsLongLong(value);
            if (number == -1 && PyErr_Occurred()) {
                return NULL;
            }
            lengths[i] = put_decimal(numbers[i], number);
        } else {
            double number = PyFloat_AsDouble(value);
            if (number == -1.0 && PyErr_Occurred()) {
                return NULL;
            }
            int written = put_seconds(numbers[i], number);
            if (written < 0 || written >= NUMBER_MAX) {
                PyErr_SetString(PyExc_SystemError, "format_line: a number did not fit");
                return NULL;
            }
            lengths[i] = written;
        }
        total += lengths[i];
    }
    PyObject *line = PyBytes_FromStringAndSize(NULL, total);
    if (line == NULL) {
        return NULL;
    }
    char *out = PyBytes_AS_STRING(line);
    for (Py_ssize_t i = 0; i < NFIELDS; i++) {
        memcpy(out, fields[i].label, fields[i].label_len);
        out += fields[i].label_len;
        PyObject *value = args[i];
        int kind = fields[i].kind;
        if (value == Py_None && (kind == F_BYTES || kind == F_FLOAT_OR_NONE)) {
            *out++ = '-';
        } else if (kind == F_BYTES) {
            const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(value);
            Py_ssize_t n = PyBytes_GET_SIZE(value);
            if (lengths[i] == n) {
                memcpy(out, s, n);
                out += n;
            } else {
                for (Py_ssize_t j = 0; j < n; j++) {
                    unsigned char c = s[j];
                    if (escape_as[c]) {
                        *out++ = '\\';
                        *out++ = (char)escape_as[c];
                    } else {
                        *out++ = (char)c;
                    }
                }
            }
        } else {
            memcpy(out, numbers[i], lengths[i]);
            out += lengths[i];
        }
    }
    *out = '\n';
    return line;
}

PyDoc_STRVAR(request_id_doc,
"request_id(prefix, count)\n"
"--\n\n"
"prefix, a dash and count (0 <= count < 2**64) in lower-case hex: b\"%s-%x\".");

static PyObject *
request_id(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "request_id(prefix: bytes, count: int)");
        return NULL;
    }
    unsigned long long count = PyLong_AsUnsignedLongLong(args[1]);
    if (count == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    char digits[16];
    int n = 0;
    do {
        digits[15 - n++] = "0123456789abcdef"[count & 15];
        count >>= 4;
    } while (count != 0);
    Py_ssize_t prefix_len = PyBytes_GET_SIZE(args[0]);
    PyObject *id = PyBytes_FromStringAndSize(NULL, prefix_len + 1 + n);
    if (id == NULL) {
        return NULL;
    }
    char *out = PyBytes_AS_STRING(id);
    memcpy(out, PyBytes_AS_STRING(args[0]), prefix_len);
    out[prefix_len] = '-';
    memcpy(out + prefix_len + 1, digits + 16 - n, n);
    return id;
}

static PyMethodDef ltsv_methods[] = {
    {"format_line", (PyCFunction)(void (*)(void))format_line, METH_FASTCALL, format_line_doc},
    {"request_id", (PyCFunction)(void (*)(void))request_id, METH_FASTCALL, request_id_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef ltsv_module = {
    PyModuleDef_HEAD_INIT, "tiers.proxy._ltsv",
    "The access log's LTSV line and request ids in one C call each.", -1, ltsv_methods,
};

PyMODINIT_FUNC
PyInit__ltsv(void)
{
    escape_as['\t'] = 't';
    escape_as['\n'] = 'n';
    escape_as['\r'] = 'r';
    escape_as['\\'] = '\\';
    return PyModule_Create(&ltsv_module);
}
