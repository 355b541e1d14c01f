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
#include <math.h>
#include <stdio.h>
#include <string.h>

enum { F_BYTES, F_INT, F_FLOAT, F_FLOAT_OR_NONE };

/* The fields in argument order, each with the label written before it. */
static const struct {
    const char *label;
    int kind;
} fields[] = {
    {"time:", F_BYTES},           {"\thost:", F_BYTES},      {"\tforwardedfor:", F_BYTES},
    {"\tmethod:", F_BYTES},       {"\turi:", F_BYTES},       {"\tprotocol:", F_BYTES},
    {"\tstatus:", F_INT},         {"\tsize:", F_INT},        {"\treqsize:", F_INT},
    {"\treferer:", F_BYTES},      {"\treqtime:", F_FLOAT},   {"\tapptime:", F_FLOAT_OR_NONE},
    {"\tupstream:", F_BYTES},     {"\tcache:", F_BYTES},     {"\troute:", F_BYTES},
    {"\treqid:", F_BYTES},        {"\tua:", F_BYTES},
};
#define NFIELDS ((Py_ssize_t)(sizeof(fields) / sizeof(fields[0])))
/* Room for any double with three decimals (DBL_MAX has 309 digits). */
#define NUMBER_MAX 320

static int
escapable(unsigned char c)
{
    return c == '\t' || c == '\n' || c == '\r' || c == '\\';
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
        total += (Py_ssize_t)strlen(fields[i].label);
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
                extra += escapable(s[j]);
            }
            lengths[i] = n + extra;
        } else if (kind == F_INT) {
            long long number = PyLong_AsLongLong(value);
            if (number == -1 && PyErr_Occurred()) {
                return NULL;
            }
            lengths[i] = snprintf(numbers[i], NUMBER_MAX, "%lld", number);
        } else {
            double number = PyFloat_AsDouble(value);
            if (number == -1.0 && PyErr_Occurred()) {
                return NULL;
            }
            /* Python writes a NaN of either sign as "nan". */
            int written = isnan(number) ? snprintf(numbers[i], NUMBER_MAX, "nan")
                                        : snprintf(numbers[i], NUMBER_MAX, "%.3f", number);
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
        size_t label = strlen(fields[i].label);
        memcpy(out, fields[i].label, label);
        out += label;
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
                    if (escapable(c)) {
                        *out++ = '\\';
                        *out++ = c == '\t' ? 't' : c == '\n' ? 'n' : c == '\r' ? 'r' : '\\';
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

static PyMethodDef ltsv_methods[] = {
    {"format_line", (PyCFunction)(void (*)(void))format_line, METH_FASTCALL, format_line_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef ltsv_module = {
    PyModuleDef_HEAD_INIT, "tiers.proxy._ltsv", "The access log's LTSV line in one C call.",
    -1, ltsv_methods,
};

PyMODINIT_FUNC
PyInit__ltsv(void)
{
    return PyModule_Create(&ltsv_module);
}
