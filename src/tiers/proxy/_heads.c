/* HTTP/1.1 message heads read and written in one C call each.
 *
 * Reading: one-pass scanners for the usual message head.
 * llhttp reports a head field by field, each through a Python callback; for
 * the plain heads that make up nearly all traffic this module reads the
 * whole head in one C call instead. It accepts a deliberately narrow grammar
 * (a subset of what llhttp accepts in strict mode) and returns None for
 * anything outside it: the caller then parses the same bytes with llhttp as
 * before, so every refusal, and every message with a body to frame, keeps
 * llhttp's verdict. What it never accepts: bare CR or LF, obs-fold, any
 * whitespace before a colon or after a value, control or non-ASCII bytes,
 * Content-Length or Transfer-Encoding in a request, Transfer-Encoding,
 * repeated or malformed Content-Length in a response, Upgrade, 1xx status.
 *
 * Writing: join_head copies a head's kept fields and the proxy's own lines
 * into one bytes object, sized first, rather than joining a list of lines.
 *
 * Names, lower-cased names and short values repeat from message to message:
 * small direct-mapped tables hand back the same bytes objects, which saves
 * the allocations and keeps each object's cached hash for the dict lookups
 * that follow.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* tchar (RFC 9110, 5.6.2) */
static unsigned char is_tchar[256];
/* a field value byte besides SP and HTAB: VCHAR only (obs-text goes to llhttp) */
static unsigned char is_vchar[256];
/* a request target byte: the path and query characters of RFC 3986 */
static unsigned char is_target[256];

#define CACHE_SLOTS 512
#define CACHE_MAX_LEN 96
/* A header name as sent and lower-cased (the same object when it already was). */
typedef struct {
    PyObject *raw;
    PyObject *lower;
} name_entry;
static name_entry name_cache[CACHE_SLOTS];
static PyObject *value_cache[CACHE_SLOTS];
/* (name, value) pairs of cached names and values. A pair holds both, so
 * neither can be freed, and its address reused, while it is cached: the
 * same two addresses are the same two objects. */
static PyObject *pair_cache[CACHE_SLOTS];

static PyObject *version_11, *version_10;
static PyObject *method_objs[7];
static const char *method_names[7] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"};
static const Py_ssize_t method_lens[7] = {3, 4, 4, 3, 6, 7, 5};


static unsigned int
slot_of(const char *s, Py_ssize_t n)
{
    /* From the length and the first and last eight bytes: constant time, and
     * enough to tell apart the names and values that recur. Two that share
     * a slot only miss the cache. */
    uint64_t head = 0, tail = 0;
    if (n >= 8) {
        memcpy(&head, s, 8);
        memcpy(&tail, s + n - 8, 8);
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            head = (head << 8) | (unsigned char)s[i];
        }
    }
    uint64_t h = head * 0x9E3779B97F4A7C15ull ^ tail * 0xC2B2AE3D27D4EB4Full
                 ^ (uint64_t)n * 0x165667B19E3779F9ull;
    return (unsigned int)(h >> 40) & (CACHE_SLOTS - 1);
}

/* The bytes object for s[0:n], from `cache` when it holds the same bytes. */
static PyObject *
cached_bytes(PyObject **cache, const char *s, Py_ssize_t n)
{
    if (n > CACHE_MAX_LEN) {
        return PyBytes_FromStringAndSize(s, n);
    }
    unsigned int slot = slot_of(s, n);
    PyObject *hit = cache[slot];
    if (hit != NULL && PyBytes_GET_SIZE(hit) == n && memcmp(PyBytes_AS_STRING(hit), s, n) == 0) {
        Py_INCREF(hit);
        return hit;
    }
    PyObject *made = PyBytes_FromStringAndSize(s, n);
    if (made == NULL) {
        return NULL;
    }
    Py_XSETREF(cache[slot], made);
    Py_INCREF(made);
    return made;
}

/* The name s[0:n] as sent (*raw) and lower-cased (*lower), both new references,
 * from the cache when it holds the same name. */
static int
cached_name(const char *s, Py_ssize_t n, PyObject **raw, PyObject **lower)
{
    name_entry *entry = NULL;
    if (n <= CACHE_MAX_LEN) {
        entry = &name_cache[slot_of(s, n)];
        PyObject *hit = entry->raw;
        if (hit != NULL && PyBytes_GET_SIZE(hit) == n
            && memcmp(PyBytes_AS_STRING(hit), s, n) == 0) {
            Py_INCREF(hit);
            Py_INCREF(entry->lower);
            *raw = hit;
            *lower = entry->lower;
            return 0;
        }
    }
    int has_upper = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        has_upper |= s[i] >= 'A' && s[i] <= 'Z';
    }
    PyObject *made_raw = PyBytes_FromStringAndSize(s, n);
    if (made_raw == NULL) {
        return -1;
    }
    PyObject *made_lower = made_raw;
    if (has_upper) {
        made_lower = PyBytes_FromStringAndSize(NULL, n);
        if (made_lower == NULL) {
            Py_DECREF(made_raw);
            return -1;
        }
        char *dst = PyBytes_AS_STRING(made_lower);
        for (Py_ssize_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)s[i];
            dst[i] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
        }
    } else {
        Py_INCREF(made_lower);
    }
    if (entry != NULL) {
        Py_INCREF(made_raw);
        Py_INCREF(made_lower);
        Py_XSETREF(entry->raw, made_raw);
        Py_XSETREF(entry->lower, made_lower);
    }
    *raw = made_raw;
    *lower = made_lower;
    return 0;
}

/* The tuple (name, value), from the cache when it holds that very pair.
 * Only pairs of a short value are kept (those are the cached values), so the
 * cache holds little memory. */
static PyObject *
cached_pair(PyObject *name, PyObject *value)
{
    if (PyBytes_GET_SIZE(value) > CACHE_MAX_LEN) {
        return PyTuple_Pack(2, name, value);
    }
    uint64_t key = ((uint64_t)(uintptr_t)name
                    ^ (uint64_t)(uintptr_t)value * 0xC2B2AE3D27D4EB4Full)
                   * 0x9E3779B97F4A7C15ull;
    PyObject **slot = &pair_cache[(key >> 40) & (CACHE_SLOTS - 1)];
    PyObject *hit = *slot;
    if (hit != NULL && PyTuple_GET_ITEM(hit, 0) == name && PyTuple_GET_ITEM(hit, 1) == value) {
        Py_INCREF(hit);
        return hit;
    }
    PyObject *made = PyTuple_Pack(2, name, value);
    if (made == NULL) {
        return NULL;
    }
    Py_INCREF(made);
    Py_XSETREF(*slot, made);
    return made;
}

/* Whether the lower-cased name `lname` is the literal `lower`. */
#define NAME_IS(lname, lower)                                                                  \
    (PyBytes_GET_SIZE(lname) == (Py_ssize_t)sizeof(lower) - 1                                  \
     && memcmp(PyBytes_AS_STRING(lname), lower, sizeof(lower) - 1) == 0)

/* The outcome of reading the header fields: parsed, declined (not the
 * narrow grammar: let llhttp decide), or a Python error. */
enum { FIELDS_OK = 0, FIELDS_DECLINE = 1, FIELDS_ERROR = -1 };

typedef struct {
    PyObject *headers; /* list of (name, value) */
    PyObject *names;   /* list of lower-cased names */
    Py_ssize_t end;    /* offset just past the blank line */
} fields_t;

/* Read "name: value\r\n" lines from p until the blank line; `stop` bounds
 * the scan. Calls `hook(ctx, lname, value)` for each, which may decline (1)
 * or fail (-1). */
typedef int (*field_hook)(void *ctx, PyObject *lname, PyObject *value);

static int
scan_fields(const char *base, Py_ssize_t p, Py_ssize_t stop, Py_ssize_t max_fields,
            fields_t *out, field_hook hook, void *ctx)
{
    out->headers = PyList_New(0);
    out->names = PyList_New(0);
    if (out->headers == NULL || out->names == NULL) {
        return FIELDS_ERROR;
    }
    Py_ssize_t count = 0;
    for (;;) {
        if (p + 1 >= stop) {
            return FIELDS_DECLINE; /* no blank line within the bounds */
        }
        if (base[p] == '\r') {
            if (base[p + 1] != '\n') {
                return FIELDS_DECLINE;
            }
            out->end = p + 2;
            return FIELDS_OK;
        }
        Py_ssize_t name_start = p;
        while (p < stop && is_tchar[(unsigned char)base[p]]) {
            p++;
        }
        Py_ssize_t name_len = p - name_start;
        if (name_len == 0 || p >= stop || base[p] != ':') {
            return FIELDS_DECLINE;
        }
        p++;
        while (p < stop && (base[p] == ' ' || base[p] == '\t')) {
            p++;
        }
        Py_ssize_t value_start = p;
        while (p < stop) {
            unsigned char c = (unsigned char)base[p];
            if (is_vchar[c] || c == ' ' || c == '\t') {
                p++;
            } else {
                break;
            }
        }
        Py_ssize_t value_len = p - value_start;
        if (p + 1 >= stop || base[p] != '\r' || base[p + 1] != '\n') {
            return FIELDS_DECLINE;
        }
        if (value_len > 0) {
            char last = base[p - 1];
            if (last == ' ' || last == '\t') {
                return FIELDS_DECLINE; /* trailing whitespace: llhttp's to trim */
            }
        }
        p += 2;
        if (++count > max_fields) {
            return FIELDS_DECLINE; /* llhttp's path answers 431 */
        }
        PyObject *name, *lname;
        if (cached_name(base + name_start, name_len, &name, &lname) < 0) {
            return FIELDS_ERROR;
        }
        PyObject *value = cached_bytes(value_cache, base + value_start, value_len);
        if (value == NULL) {
            Py_DECREF(name);
            Py_DECREF(lname);
            return FIELDS_ERROR;
        }
        int verdict = hook(ctx, lname, value);
        if (verdict != FIELDS_OK) {
            Py_DECREF(name);
            Py_DECREF(value);
            Py_DECREF(lname);
            return verdict;
        }
        PyObject *pair = cached_pair(name, value);
        Py_DECREF(name);
        Py_DECREF(value);
        if (pair == NULL) {
            Py_DECREF(lname);
            return FIELDS_ERROR;
        }
        int failed = PyList_Append(out->headers, pair) < 0 || PyList_Append(out->names, lname) < 0;
        Py_DECREF(pair);
        Py_DECREF(lname);
        if (failed) {
            return FIELDS_ERROR;
        }
    }
}

/* ---- requests -------------------------------------------------------- */

/* The fields the request parser looks at by name (requestparser._SPECIAL, less
 * the framing ones, which the scanner declines), in the order scan_request
 * returns their values. */
enum { F_HOST, F_CONNECTION, F_USER_AGENT, F_FORWARDED_FOR, F_REFERER, F_EXPECT, F_COUNT };

typedef struct {
    /* Each field's value, or NULL. Borrowed: the headers list holds them. */
    PyObject *fields[F_COUNT];
} request_ctx;

static int
request_field(void *ctx_, PyObject *lname, PyObject *value)
{
    request_ctx *ctx = (request_ctx *)ctx_;
    int field;
    if (NAME_IS(lname, "host")) {
        field = F_HOST;
    } else if (NAME_IS(lname, "user-agent")) {
        field = F_USER_AGENT;
    } else if (NAME_IS(lname, "connection")) {
        field = F_CONNECTION;
    } else if (NAME_IS(lname, "x-forwarded-for")) {
        field = F_FORWARDED_FOR;
    } else if (NAME_IS(lname, "referer")) {
        field = F_REFERER;
    } else if (NAME_IS(lname, "expect")) {
        field = F_EXPECT;
    } else if (NAME_IS(lname, "content-length") || NAME_IS(lname, "transfer-encoding")
               || NAME_IS(lname, "upgrade")) {
        return FIELDS_DECLINE; /* a body to frame or a protocol switch: llhttp's */
    } else {
        return FIELDS_OK;
    }
    if (ctx->fields[field] != NULL) {
        return FIELDS_DECLINE; /* repeated: the parser joins or refuses them */
    }
    ctx->fields[field] = value;
    return FIELDS_OK;
}

/* A tuple of the n borrowed references in items (Py_BuildValue without
 * reading a format string on every call); NULL with an error set. */
static PyObject *
tuple_of(PyObject **items, Py_ssize_t n)
{
    PyObject *tuple = PyTuple_New(n);
    if (tuple == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_INCREF(items[i]);
        PyTuple_SET_ITEM(tuple, i, items[i]);
    }
    return tuple;
}

/* The version object of "HTTP/1.<minor>", or NULL for another minor version. */
static PyObject *
http1_version(char minor)
{
    return minor == '1' ? version_11 : minor == '0' ? version_10 : NULL;
}

/* The plain request head base[start:stop] (which ends with the blank line) as
 * scan_request's tuple; None if it is not plain; NULL with an error set. */
static PyObject *
read_request(const char *base, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t max_fields)
{
    Py_ssize_t p = start;

    PyObject *method = NULL;
    for (int i = 0; i < 7; i++) {
        Py_ssize_t len = method_lens[i];
        if (stop - p > len && memcmp(base + p, method_names[i], len) == 0 && base[p + len] == ' ') {
            method = method_objs[i];
            p += len + 1;
            break;
        }
    }
    if (method == NULL || p >= stop || base[p] != '/') {
        Py_RETURN_NONE;
    }
    Py_ssize_t target_start = p;
    while (p < stop && is_target[(unsigned char)base[p]]) {
        p++;
    }
    Py_ssize_t target_len = p - target_start;
    if (stop - p < 10 || base[p] != ' ' || memcmp(base + p + 1, "HTTP/1.", 7) != 0
        || base[p + 9] != '\r' || base[p + 10] != '\n') {
        Py_RETURN_NONE;
    }
    PyObject *version = http1_version(base[p + 8]);
    if (version == NULL) {
        Py_RETURN_NONE;
    }
    p += 11;

    request_ctx ctx = {{NULL}};
    fields_t fields = {NULL, NULL, 0};
    int verdict = scan_fields(base, p, stop, max_fields, &fields, request_field, &ctx);
    PyObject *result = NULL;
    /* On FIELDS_OK the blank line read is the first one, which ends at stop. */
    if (verdict == FIELDS_OK) {
        PyObject *target = PyBytes_FromStringAndSize(base + target_start, target_len);
        if (target != NULL) {
            PyObject **f = ctx.fields;
            for (int i = 0; i < F_COUNT; i++) {
                if (f[i] == NULL) {
                    f[i] = Py_None;
                }
            }
            PyObject *end = PyLong_FromSsize_t(stop);
            if (end != NULL) {
                PyObject *items[] = {method, target, version, fields.headers, fields.names, end,
                                     f[F_HOST], f[F_CONNECTION], f[F_USER_AGENT],
                                     f[F_FORWARDED_FOR], f[F_REFERER], f[F_EXPECT]};
                result = tuple_of(items, 12);
                Py_DECREF(end);
            }
            Py_DECREF(target);
        }
    } else if (verdict == FIELDS_DECLINE) {
        result = Py_None;
        Py_INCREF(result);
    }
    Py_XDECREF(fields.headers);
    Py_XDECREF(fields.names);
    return result;
}

PyDoc_STRVAR(scan_request_doc,
"scan_request(data, start, max_head, max_line, max_fields)\n"
"--\n\n"
"Find the request head that begins at data[start] and read it if it is a\n"
"plain one without a body. The head must end (blank line included) within\n"
"max_head bytes and its request line, CRLF excluded, be at most max_line.\n"
"Returns (method, target, version, headers, names, stop, host, connection,\n"
"user_agent, forwarded_for, referer, expect) when read, where the head is\n"
"data[start:stop] and each of the last six is that field's value or None\n"
"(a repeated one is declined); the int stop when the head is there\n"
"within the limits but not plain (parse data[start:stop] with llhttp); -1\n"
"when the head does not end within data or the limits.");

static PyObject *
scan_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "scan_request(data: bytes, start, max_head, max_line, max_fields)");
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t max_head = PyLong_AsSsize_t(args[2]);
    Py_ssize_t max_line = PyLong_AsSsize_t(args[3]);
    Py_ssize_t max_fields = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (start < 0 || start > size || max_head < 0 || max_line < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "scan_request: start outside the data or a negative limit");
        return NULL;
    }
    const char *base = PyBytes_AS_STRING(args[0]);
    /* The first blank line, if the whole head fits in max_head bytes. */
    Py_ssize_t window = size - start < max_head ? size - start : max_head;
    const char *blank = memmem(base + start, (size_t)window, "\r\n\r\n", 4);
    if (blank == NULL) {
        return PyLong_FromLong(-1);
    }
    Py_ssize_t stop = blank - base + 4;
    const char *newline = memchr(base + start, '\n', (size_t)(stop - start));
    if (newline - (base + start) - 1 > max_line) {
        return PyLong_FromLong(-1);
    }
    PyObject *result = read_request(base, start, stop, max_fields);
    if (result == Py_None) {
        Py_DECREF(result);
        return PyLong_FromSsize_t(stop);
    }
    return result;
}

/* ---- responses ------------------------------------------------------- */

typedef struct {
    long long content_length; /* -1: none */
    PyObject *connection;     /* the Connection field's value (borrowed), or NULL */
} response_ctx;

static int
response_field(void *ctx_, PyObject *lname, PyObject *value)
{
    response_ctx *ctx = (response_ctx *)ctx_;
    if (NAME_IS(lname, "transfer-encoding") || NAME_IS(lname, "upgrade")) {
        return FIELDS_DECLINE;
    }
    if (NAME_IS(lname, "connection")) {
        if (ctx->connection != NULL) {
            return FIELDS_DECLINE; /* repeated: the parser joins them */
        }
        /* Held by the headers list, which outlives the scan. */
        ctx->connection = value;
        return FIELDS_OK;
    }
    if (NAME_IS(lname, "content-length")) {
        if (ctx->content_length != -1) {
            return FIELDS_DECLINE; /* repeated: llhttp's to refuse */
        }
        const char *digits = PyBytes_AS_STRING(value);
        Py_ssize_t len = PyBytes_GET_SIZE(value);
        if (len == 0 || len > 18) {
            return FIELDS_DECLINE;
        }
        long long length = 0;
        for (Py_ssize_t i = 0; i < len; i++) {
            if (digits[i] < '0' || digits[i] > '9') {
                return FIELDS_DECLINE;
            }
            length = length * 10 + (digits[i] - '0');
        }
        ctx->content_length = length;
    }
    return FIELDS_OK;
}

PyDoc_STRVAR(scan_response_doc,
"scan_response(data, max_fields)\n"
"--\n\n"
"Read the final response head at the start of data if it is a plain one:\n"
"(status, reason, version, headers, names, head_end, content_length,\n"
"connection), with content_length -1 when there is no Content-Length and\n"
"connection the Connection field's value or None. None when it is not\n"
"plain (a transfer coding, an upgrade, a repeated Content-Length or\n"
"Connection, ...), or when data does not hold the whole head: parse it with\n"
"llhttp instead.");

static PyObject *
scan_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "scan_response(data: bytes, max_fields)");
        return NULL;
    }
    Py_ssize_t max_fields = PyLong_AsSsize_t(args[1]);
    if (max_fields == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const char *base = PyBytes_AS_STRING(args[0]);
    Py_ssize_t stop = PyBytes_GET_SIZE(args[0]);
    /* "HTTP/1.x NNN " */
    if (stop < 13 || memcmp(base, "HTTP/1.", 7) != 0 || base[8] != ' ' || base[12] != ' ') {
        Py_RETURN_NONE;
    }
    PyObject *version = http1_version(base[7]);
    if (version == NULL) {
        Py_RETURN_NONE;
    }
    int status = 0;
    for (int i = 9; i < 12; i++) {
        if (base[i] < '0' || base[i] > '9') {
            Py_RETURN_NONE;
        }
        status = status * 10 + (base[i] - '0');
    }
    if (status < 200) {
        Py_RETURN_NONE; /* interim responses: llhttp's */
    }
    Py_ssize_t p = 13;
    Py_ssize_t reason_start = p;
    while (p < stop && (is_vchar[(unsigned char)base[p]] || base[p] == ' ' || base[p] == '\t')) {
        p++;
    }
    Py_ssize_t reason_len = p - reason_start;
    if (p + 1 >= stop || base[p] != '\r' || base[p + 1] != '\n') {
        Py_RETURN_NONE;
    }
    p += 2;

    response_ctx ctx = {-1, NULL};
    fields_t fields = {NULL, NULL, 0};
    int verdict = scan_fields(base, p, stop, max_fields, &fields, response_field, &ctx);
    PyObject *result = NULL;
    if (verdict == FIELDS_OK) {
        PyObject *reason = cached_bytes(value_cache, base + reason_start, reason_len);
        PyObject *code = reason == NULL ? NULL : PyLong_FromLong(status);
        PyObject *end = code == NULL ? NULL : PyLong_FromSsize_t(fields.end);
        PyObject *length = end == NULL ? NULL : PyLong_FromLongLong(ctx.content_length);
        if (length != NULL) {
            PyObject *items[] = {code, reason, version, fields.headers, fields.names, end, length,
                                 ctx.connection != NULL ? ctx.connection : Py_None};
            result = tuple_of(items, 8);
        }
        Py_XDECREF(reason);
        Py_XDECREF(code);
        Py_XDECREF(end);
        Py_XDECREF(length);
    } else if (verdict == FIELDS_DECLINE) {
        result = Py_None;
        Py_INCREF(result);
    }
    Py_XDECREF(fields.headers);
    Py_XDECREF(fields.names);
    return result;
}

/* ---- writing heads --------------------------------------------------- */

/* The size of the bytes line `i` of `lines`; -1 with an error set if not bytes. */
static Py_ssize_t
line_size(PyObject *lines, Py_ssize_t i)
{
    PyObject *line = PyList_GET_ITEM(lines, i);
    if (!PyBytes_Check(line)) {
        PyErr_SetString(PyExc_TypeError, "join_head: lines must be bytes");
        return -1;
    }
    return PyBytes_GET_SIZE(line);
}

/* The total size of the lines of `lines`, each with its CRLF; -1 on error. */
static Py_ssize_t
lines_size(PyObject *lines)
{
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lines); i++) {
        Py_ssize_t n = line_size(lines, i);
        if (n < 0) {
            return -1;
        }
        total += n + 2;
    }
    return total;
}

static int
field_parts(PyObject *headers, Py_ssize_t i, PyObject **name, PyObject **value)
{
    PyObject *field = PyList_GET_ITEM(headers, i);
    if (!PyTuple_Check(field) || PyTuple_GET_SIZE(field) != 2
        || !PyBytes_Check(PyTuple_GET_ITEM(field, 0))
        || !PyBytes_Check(PyTuple_GET_ITEM(field, 1))) {
        PyErr_SetString(PyExc_TypeError, "join_head: header fields must be (bytes, bytes)");
        return -1;
    }
    *name = PyTuple_GET_ITEM(field, 0);
    *value = PyTuple_GET_ITEM(field, 1);
    return 0;
}

static char *
put(char *out, const char *data, Py_ssize_t n)
{
    memcpy(out, data, n);
    return out + n;
}

static char *
put_lines(char *out, PyObject *lines)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lines); i++) {
        PyObject *line = PyList_GET_ITEM(lines, i);
        out = put(out, PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line));
        out = put(out, "\r\n", 2);
    }
    return out;
}

PyDoc_STRVAR(join_head_doc,
"join_head(first, names, headers, drop, last)\n"
"--\n\n"
"A message head: the lines of `first`, then each header field (name, value)\n"
"of `headers` whose lower-cased name (parallel list `names`) is not in the\n"
"set `drop`, as \"name: value\", then the lines of `last`, each line ended\n"
"by CRLF, then the blank line.");

static PyObject *
join_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyList_Check(args[0]) || !PyList_Check(args[1])
        || !PyList_Check(args[2]) || !PyAnySet_Check(args[3]) || !PyList_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "join_head(first: list, names: list, headers: list, drop: set, last: list)");
        return NULL;
    }
    PyObject *first = args[0], *names = args[1], *headers = args[2], *drop = args[3];
    PyObject *last = args[4];
    Py_ssize_t count = PyList_GET_SIZE(headers);
    if (PyList_GET_SIZE(names) != count) {
        PyErr_SetString(PyExc_ValueError, "join_head: names and headers differ in length");
        return NULL;
    }
    /* Which fields are kept, asked of `drop` once each. A set lookup may run
     * Python code (an odd member's __eq__); nothing after this loop does, so
     * the lists are measured and copied as they then stand. */
    unsigned char on_stack[64];
    unsigned char *kept = count <= 64 ? on_stack : PyMem_Malloc(count);
    if (kept == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *head = NULL;
    for (Py_ssize_t i = 0; i < count && i < PyList_GET_SIZE(names); i++) {
        PyObject *name = PyList_GET_ITEM(names, i);
        if (!PyBytes_CheckExact(name)) {
            PyErr_SetString(PyExc_TypeError, "join_head: names must be bytes");
            goto done;
        }
        int dropped = PySet_Contains(drop, name);
        if (dropped < 0) {
            goto done;
        }
        kept[i] = !dropped;
    }
    if (PyList_GET_SIZE(names) != count || PyList_GET_SIZE(headers) != count) {
        PyErr_SetString(PyExc_RuntimeError, "join_head: the headers changed while read");
        goto done;
    }
    Py_ssize_t first_size = lines_size(first), last_size = lines_size(last);
    if (first_size < 0 || last_size < 0) {
        goto done;
    }
    Py_ssize_t total = first_size + last_size + 2;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name, *value;
        if (field_parts(headers, i, &name, &value) < 0) {
            goto done;
        }
        if (kept[i]) {
            total += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4;
        }
    }
    head = PyBytes_FromStringAndSize(NULL, total);
    if (head == NULL) {
        goto done;
    }
    char *out = put_lines(PyBytes_AS_STRING(head), first);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (kept[i]) {
            PyObject *field = PyList_GET_ITEM(headers, i);
            PyObject *name = PyTuple_GET_ITEM(field, 0), *value = PyTuple_GET_ITEM(field, 1);
            out = put(out, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name));
            out = put(out, ": ", 2);
            out = put(out, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
            out = put(out, "\r\n", 2);
        }
    }
    out = put_lines(out, last);
    put(out, "\r\n", 2);
done:
    if (kept != on_stack) {
        PyMem_Free(kept);
    }
    return head;
}

static PyMethodDef scan_methods[] = {
    {"scan_request", (PyCFunction)(void (*)(void))scan_request, METH_FASTCALL, scan_request_doc},
    {"scan_response", (PyCFunction)(void (*)(void))scan_response, METH_FASTCALL,
     scan_response_doc},
    {"join_head", (PyCFunction)(void (*)(void))join_head, METH_FASTCALL, join_head_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT, "tiers.proxy._heads",
    "HTTP/1.1 heads read and written in one call each (scanners: None means ask llhttp).", -1,
    scan_methods,
};

static void
fill_tables(void)
{
    const char *extra_tchar = "!#$%&'*+-.^_`|~";
    const char *extra_target = "-._~!$&'()*+,;=:@/?%";
    for (int c = 0; c < 256; c++) {
        int alnum = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
        is_tchar[c] = alnum || (c != 0 && strchr(extra_tchar, c) != NULL);
        is_target[c] = alnum || (c != 0 && strchr(extra_target, c) != NULL);
        is_vchar[c] = c >= 0x21 && c <= 0x7e;
    }
}

PyMODINIT_FUNC
PyInit__heads(void)
{
    fill_tables();
    version_11 = PyBytes_FromString("1.1");
    version_10 = PyBytes_FromString("1.0");
    if (version_11 == NULL || version_10 == NULL) {
        return NULL;
    }
    for (int i = 0; i < 7; i++) {
        method_objs[i] = PyBytes_FromString(method_names[i]);
        if (method_objs[i] == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&scan_module);
}
