/* The audit hook's hot path in C (see ngp_research/kernel/auditor.py).
 *
 * A Python audit hook is a Python call for every audit event the interpreter raises; this one is
 * a C function (PySys_AddAuditHook), so the events the kernel does not record cost a few string
 * compares, and a plain ``open`` of an absolute path is appended to the auditor's buffer without
 * entering Python. Every other recorded event is handed to the auditor's Python hook, unchanged.
 *
 * install(handler, buffer, current, wake, ignored, always, events, capacity, batch)
 *   handler  the Python hook: handler(event, args) for recorded events other than a plain open
 *   buffer   the auditor's list; a plain open appends ("o", path, mode, flags, current[0]), and an
 *            ``ngp.data.open`` (absolute str path, dict) from the library wrappers appends
 *            ("d", path, copy of the dict, current[0], None)
 *   current  a one-element list: the (msg_id, cell_id) records are attributed to
 *   wake     a callable: called when the buffer becomes non-empty or reaches ``batch``
 *   ignored  path prefixes (no trailing slash) not recorded, unless under one of ``always``
 *   always   path prefixes always recorded
 *   events   the names of the events recorded (others return at once); "import" is handed on only
 *            for modules under ngp_research
 *   capacity the buffer's bound: past it, the open goes to the handler (which delivers or refuses)
 *
 * It can be installed once per process; nothing it holds can be replaced from Python, and an audit
 * hook cannot be removed. In a forked child (no sender thread there) every recorded event goes to the
 * handler, which delivers it before the access happens: pthread_atfork marks the child.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <string.h>
#include <math.h>

#define MAX_PREFIXES 64
#define MAX_EVENTS 64

static int installed = 0;
static int write_through = 0;  /* after the auditor's close(): every recorded event goes to the handler */
static int selftest_seen = 0;
static PyObject *handler, *buffer, *current, *wake, *tag_open, *tag_data;
static Py_ssize_t capacity, batch;
static char *ignored[MAX_PREFIXES];
static Py_ssize_t ignored_len[MAX_PREFIXES];
static int n_ignored = 0;
static char *always[MAX_PREFIXES];
static Py_ssize_t always_len[MAX_PREFIXES];
static int n_always = 0;
static char *events[MAX_EVENTS];
static int n_events = 0;
static unsigned long handled = 0, fast = 0;

static void
in_child_after_fork(void)
{
    write_through = 1;
}

static int
under(const char *s, Py_ssize_t n, const char *prefix, Py_ssize_t len)
{
    return n >= len && memcmp(s, prefix, (size_t)len) == 0 && (n == len || s[len] == '/');
}

static int
is_ignored(const char *s, Py_ssize_t n)
{
    int i;
    for (i = 0; i < n_always; i++)
        if (under(s, n, always[i], always_len[i]))
            return 0;
    for (i = 0; i < n_ignored; i++)
        if (under(s, n, ignored[i], ignored_len[i]))
            return 1;
    return 0;
}

static int
is_recorded_event(const char *event)
{
    int i;
    for (i = 0; i < n_events; i++)
        if (event[0] == events[i][0] && strcmp(event, events[i]) == 0)
            return 1;
    return 0;
}

static int append(PyObject *item, Py_ssize_t len);

/* 1: appended; 0: not a plain open (hand it on); -1: error */
static int
fast_open(PyObject *args)
{
    PyObject *path, *item;
    const char *s;
    Py_ssize_t n, len;

    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) < 3)
        return 0;
    path = PyTuple_GET_ITEM(args, 0);
    if (!PyUnicode_CheckExact(path))
        return 0;
    s = PyUnicode_AsUTF8AndSize(path, &n);
    if (s == NULL) {  /* e.g. surrogate-escaped bytes: the Python hook decodes those */
        PyErr_Clear();
        return 0;
    }
    if (n == 0 || s[0] != '/' || memmem(s, (size_t)n, "/.", 2) != NULL || memmem(s, (size_t)n, "//", 2) != NULL)
        return 0;
    if (is_ignored(s, n))
        return 1;
    if (PyList_GET_SIZE(current) != 1)
        return 0;  /* tampered with: the handler fails closed */
    len = PyList_GET_SIZE(buffer);
    if (len >= capacity)
        return 0;  /* full: the Python hook delivers now or refuses the open */
    item = PyTuple_Pack(5, tag_open, path, PyTuple_GET_ITEM(args, 1), PyTuple_GET_ITEM(args, 2),
                        PyList_GET_ITEM(current, 0));
    return append(item, len);
}

static int
append(PyObject *item, Py_ssize_t len)
{
    if (item == NULL)
        return -1;
    if (PyList_Append(buffer, item) < 0) {
        Py_DECREF(item);
        return -1;
    }
    Py_DECREF(item);
    fast++;
    if (len == 0 || len + 1 == batch) {
        PyObject *r = PyObject_CallNoArgs(wake);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 1;
}

/* 1 when every key is an exact str and every value an exact str, int, float, bool or None */
static int
plain_dict(PyObject *d)
{
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k))
            return 0;
        if (!(v == Py_None || PyUnicode_CheckExact(v) || PyLong_CheckExact(v) || PyFloat_CheckExact(v) || PyBool_Check(v)))
            return 0;
    }
    return 1;
}

/* ngp.data.open (path, detail) from the library wrappers: 1 appended; 0 hand it on; -1 error */
static int
fast_data(PyObject *args)
{
    PyObject *path, *detail, *copy, *item;
    const char *s;
    Py_ssize_t n, len;

    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != 2)
        return 0;
    path = PyTuple_GET_ITEM(args, 0);
    detail = PyTuple_GET_ITEM(args, 1);
    if (!PyUnicode_CheckExact(path) || !PyDict_CheckExact(detail))
        return 0;
    s = PyUnicode_AsUTF8AndSize(path, &n);
    if (s == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (n == 0 || s[0] != '/' || memmem(s, (size_t)n, "/.", 2) != NULL || memmem(s, (size_t)n, "//", 2) != NULL)
        return 0;
    if (PyList_GET_SIZE(current) != 1 || !plain_dict(detail))
        return 0;  /* values that are not plain: the handler makes them plain without running user code */
    len = PyList_GET_SIZE(buffer);
    if (len >= capacity)
        return 0;
    copy = PyDict_Copy(detail);  /* the record keeps what was passed, whatever the caller does with its dict */
    if (copy == NULL)
        return -1;
    item = PyTuple_Pack(5, tag_data, path, copy, PyList_GET_ITEM(current, 0), Py_None);
    Py_DECREF(copy);
    return append(item, len);
}

static int
audit_hook(const char *event, PyObject *args, void *data)
{
    PyObject *name, *r;
    (void)data;
    if (!installed)
        return 0;
    if (event[0] == 'o' && strcmp(event, "open") == 0) {
        int done = write_through ? 0 : fast_open(args);
        if (done != 0)
            return done < 0 ? -1 : 0;
    }
    else if (event[0] == 'n' && strcmp(event, "ngp.data.open") == 0) {
        int done = write_through ? 0 : fast_data(args);
        if (done != 0)
            return done < 0 ? -1 : 0;
    }
    else if (event[0] == 'n' && strcmp(event, "ngp.hook.selftest") == 0) {
        selftest_seen = 1;
        return 0;
    }
    else if (!is_recorded_event(event)) {
        return 0;
    }
    else if (strcmp(event, "import") == 0) {
        PyObject *mod = PyTuple_Check(args) && PyTuple_GET_SIZE(args) > 0 ? PyTuple_GET_ITEM(args, 0) : NULL;
        const char *m;
        if (mod == NULL || !PyUnicode_Check(mod))
            return 0;
        m = PyUnicode_AsUTF8(mod);
        if (m == NULL) {
            PyErr_Clear();
            return 0;
        }
        if (strncmp(m, "ngp_research", 12) != 0)
            return 0;
    }
    handled++;
    name = PyUnicode_FromString(event);
    if (name == NULL)
        return -1;
    r = PyObject_CallFunctionObjArgs(handler, name, args, NULL);
    Py_DECREF(name);
    if (r == NULL)
        return -1;  /* the handler refused the access (AuditUnavailable): the operation fails */
    Py_DECREF(r);
    return 0;
}

static int
copy_strings(PyObject *seq, char **out, Py_ssize_t *lens, int *count, int max, const char *what)
{
    Py_ssize_t i, n;
    PyObject *fast_seq = PySequence_Fast(seq, what);
    if (fast_seq == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(fast_seq);
    if (n > max) {
        Py_DECREF(fast_seq);
        PyErr_Format(PyExc_ValueError, "%s: at most %d", what, max);
        return -1;
    }
    for (i = 0; i < n; i++) {
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(fast_seq, i), &len);
        if (s == NULL || len == 0) {
            Py_DECREF(fast_seq);
            if (s != NULL)
                PyErr_Format(PyExc_ValueError, "%s: empty string", what);
            return -1;
        }
        out[i] = (char *)PyMem_RawMalloc((size_t)len + 1);
        if (out[i] == NULL) {
            Py_DECREF(fast_seq);
            PyErr_NoMemory();
            return -1;
        }
        memcpy(out[i], s, (size_t)len + 1);
        if (lens != NULL)
            lens[i] = len;
    }
    *count = (int)n;
    Py_DECREF(fast_seq);
    return 0;
}

static PyObject *
install(PyObject *self, PyObject *args)
{
    PyObject *h, *buf, *cur, *wk, *ign, *alw, *evs;
    Py_ssize_t cap, bat;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO!O!OOOOnn", &h, &PyList_Type, &buf, &PyList_Type, &cur, &wk, &ign, &alw, &evs,
                          &cap, &bat))
        return NULL;
    if (installed) {
        PyErr_SetString(PyExc_RuntimeError, "the audit hook is already installed in this process");
        return NULL;
    }
    if (!PyCallable_Check(h) || !PyCallable_Check(wk)) {
        PyErr_SetString(PyExc_TypeError, "handler and wake must be callable");
        return NULL;
    }
    if (PyList_GET_SIZE(cur) != 1) {
        PyErr_SetString(PyExc_ValueError, "current: a list of one element");
        return NULL;
    }
    if (copy_strings(ign, ignored, ignored_len, &n_ignored, MAX_PREFIXES, "ignored") < 0 ||
        copy_strings(alw, always, always_len, &n_always, MAX_PREFIXES, "always") < 0 ||
        copy_strings(evs, events, NULL, &n_events, MAX_EVENTS, "events") < 0)
        return NULL;
    tag_open = PyUnicode_InternFromString("o");
    tag_data = PyUnicode_InternFromString("d");
    if (tag_open == NULL || tag_data == NULL)
        return NULL;
    Py_INCREF(h); Py_INCREF(buf); Py_INCREF(cur); Py_INCREF(wk);
    handler = h; buffer = buf; current = cur; wake = wk;  /* held for the life of the process */
    capacity = cap;
    batch = bat;
    if (pthread_atfork(NULL, NULL, in_child_after_fork) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    installed = 1;
    if (PySys_AddAuditHook(audit_hook, NULL) < 0) {
        installed = 0;
        return NULL;
    }
    /* PySys_AddAuditHook can return 0 without adding the hook (an earlier hook refused it): check */
    if (PySys_Audit("ngp.hook.selftest", NULL) < 0)
        return NULL;
    if (!selftest_seen) {
        PyErr_SetString(PyExc_RuntimeError, "the C audit hook was not added");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
set_write_through(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    write_through = 1;
    Py_RETURN_NONE;
}

static PyObject *
stats(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    return Py_BuildValue("{s:O,s:k,s:k}", "installed", installed ? Py_True : Py_False, "fast", fast,
                         "handed_on", handled);
}


/* -- encode(items, dump, escape, record_text) -> bytes -----------------------------------------------
 *
 * The body the sender POSTs for buffered items, ``{"records":[...]}``: what the auditor's Python
 * ``_encode`` and ``json.dumps`` make of the same items, built here so that the sender thread spends
 * next to no time holding the GIL while a cell runs. A run of ``("o", path, mode, flags, ids)`` items
 * with equal mode, flags and ids becomes one record with ``paths``; a ``("d", path, detail, ids, None)``
 * item one ``data.open`` record; any other item's record is ``record_text(record)``. Values other
 * than exact str, int, finite float, bool and None are encoded by ``dump`` (json.dumps); a str that
 * is not plain printable ASCII by ``escape`` (json's encode_basestring_ascii).
 */

typedef struct {
    char *p;
    Py_ssize_t n, cap;
} buf_t;

static int
buf_grow(buf_t *b, Py_ssize_t more)
{
    Py_ssize_t want = b->n + more;
    char *p;
    if (want <= b->cap)
        return 0;
    if (b->cap > PY_SSIZE_T_MAX / 2 - more) {
        PyErr_NoMemory();
        return -1;
    }
    want = want > 2 * b->cap ? want + 4096 : 2 * b->cap;
    p = PyMem_Realloc(b->p, (size_t)want);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = want;
    return 0;
}

static int
buf_put(buf_t *b, const char *s, Py_ssize_t n)
{
    if (buf_grow(b, n) < 0)
        return -1;
    memcpy(b->p + b->n, s, (size_t)n);
    b->n += n;
    return 0;
}

#define PUT(b, lit) buf_put((b), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* the text of a str object from Python (dump/escape results) */
static int
buf_put_text(buf_t *b, PyObject *text)
{
    const char *s;
    Py_ssize_t n;
    if (text == NULL)
        return -1;
    if (!PyUnicode_Check(text)) {
        Py_DECREF(text);
        PyErr_SetString(PyExc_TypeError, "encode: dump/escape must return str");
        return -1;
    }
    s = PyUnicode_AsUTF8AndSize(text, &n);
    if (s == NULL || buf_put(b, s, n) < 0) {
        Py_DECREF(text);
        return -1;
    }
    Py_DECREF(text);
    return 0;
}

static int
put_str(buf_t *b, PyObject *s, PyObject *escape)
{
    if (PyUnicode_IS_ASCII(s)) {
        const unsigned char *c = (const unsigned char *)PyUnicode_DATA(s);
        Py_ssize_t i, n = PyUnicode_GET_LENGTH(s);
        for (i = 0; i < n; i++)
            if (c[i] < 0x20 || c[i] == '"' || c[i] == '\\' || c[i] == 0x7f)
                break;
        if (i == n) {
            if (buf_grow(b, n + 2) < 0)
                return -1;
            b->p[b->n++] = '"';
            memcpy(b->p + b->n, c, (size_t)n);
            b->n += n;
            b->p[b->n++] = '"';
            return 0;
        }
    }
    return buf_put_text(b, PyObject_CallOneArg(escape, s));
}

static int
put_value(buf_t *b, PyObject *v, PyObject *dump, PyObject *escape)
{
    if (PyUnicode_CheckExact(v))
        return put_str(b, v, escape);
    if (v == Py_None)
        return PUT(b, "null");
    if (v == Py_True)
        return PUT(b, "true");
    if (v == Py_False)
        return PUT(b, "false");
    if (PyLong_CheckExact(v) || (PyFloat_CheckExact(v) && isfinite(PyFloat_AS_DOUBLE(v))))
        return buf_put_text(b, PyObject_Repr(v));  /* int and float reprs are their JSON */
    return buf_put_text(b, PyObject_CallOneArg(dump, v));
}

/* ,"msg_id":I0,"cell_id":I1 from the ids tuple (anything else: both null, as the Python side fails closed) */
static int
put_ids(buf_t *b, PyObject *ids, PyObject *dump, PyObject *escape)
{
    if (!PyTuple_CheckExact(ids) || PyTuple_GET_SIZE(ids) != 2) {
        PyErr_SetString(PyExc_ValueError, "encode: ids must be a (msg_id, cell_id) tuple");
        return -1;
    }
    if (PUT(b, "\"msg_id\":") < 0 || put_value(b, PyTuple_GET_ITEM(ids, 0), dump, escape) < 0 ||
        PUT(b, ",\"cell_id\":") < 0 || put_value(b, PyTuple_GET_ITEM(ids, 1), dump, escape) < 0)
        return -1;
    return 0;
}

static int
same(PyObject *a, PyObject *b)
{
    if (a == b)
        return 1;
    return PyObject_RichCompareBool(a, b, Py_EQ);
}

static PyObject *
encode(PyObject *self, PyObject *args)
{
    PyObject *items, *dump, *escape, *record_text, *seq, *result = NULL;
    Py_ssize_t i, j, n;
    buf_t b = {NULL, 0, 0};
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOO", &items, &dump, &escape, &record_text))
        return NULL;
    seq = PySequence_Fast(items, "encode: items must be a sequence");
    if (seq == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    if (PUT(&b, "{\"records\":[") < 0)
        goto done;
    for (i = 0; i < n; i = j) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, i), *tag;
        if (!PyTuple_CheckExact(it) || PyTuple_GET_SIZE(it) != 5) {
            PyErr_SetString(PyExc_ValueError, "encode: buffer items are 5-tuples");
            goto done;
        }
        if (i > 0 && PUT(&b, ",") < 0)
            goto done;
        tag = PyTuple_GET_ITEM(it, 0);
        j = i + 1;
        if (PyUnicode_CheckExact(tag) && PyUnicode_GET_LENGTH(tag) == 1 && PyUnicode_READ_CHAR(tag, 0) == 'o') {
            PyObject *mode = PyTuple_GET_ITEM(it, 2), *flags = PyTuple_GET_ITEM(it, 3), *ids = PyTuple_GET_ITEM(it, 4);
            Py_ssize_t k;
            for (; j < n; j++) {  /* the run: the same tag, mode, flags and ids */
                PyObject *nx = PySequence_Fast_GET_ITEM(seq, j);
                int eq;
                if (!PyTuple_CheckExact(nx) || PyTuple_GET_SIZE(nx) != 5)
                    break;
                eq = same(PyTuple_GET_ITEM(nx, 0), tag);
                if (eq > 0)
                    eq = same(PyTuple_GET_ITEM(nx, 2), mode);
                if (eq > 0)
                    eq = same(PyTuple_GET_ITEM(nx, 3), flags);
                if (eq > 0)
                    eq = same(PyTuple_GET_ITEM(nx, 4), ids);
                if (eq < 0)
                    goto done;
                if (!eq)
                    break;
            }
            if (PUT(&b, "{\"action\":\"file.open\",\"detail\":{\"event\":\"open\",\"mode\":") < 0 ||
                put_value(&b, mode, dump, escape) < 0 || PUT(&b, ",\"flags\":") < 0 ||
                put_value(&b, flags, dump, escape) < 0 || PUT(&b, ",") < 0 || put_ids(&b, ids, dump, escape) < 0 ||
                (j - i == 1 ? PUT(&b, "},\"path\":") : PUT(&b, "},\"paths\":[")) < 0)
                goto done;
            for (k = i; k < j; k++) {
                PyObject *path = PyTuple_GET_ITEM(PySequence_Fast_GET_ITEM(seq, k), 1);
                if ((k > i && PUT(&b, ",") < 0) || put_value(&b, path, dump, escape) < 0)
                    goto done;
            }
            if ((j - i == 1 ? PUT(&b, "}") : PUT(&b, "]}")) < 0)
                goto done;
        }
        else if (PyUnicode_CheckExact(tag) && PyUnicode_GET_LENGTH(tag) == 1 && PyUnicode_READ_CHAR(tag, 0) == 'd'
                 && PyDict_CheckExact(PyTuple_GET_ITEM(it, 2))) {
            PyObject *detail = PyTuple_GET_ITEM(it, 2), *k, *v;
            Py_ssize_t pos = 0;
            if (PUT(&b, "{\"action\":\"data.open\",\"path\":") < 0 ||
                put_value(&b, PyTuple_GET_ITEM(it, 1), dump, escape) < 0 || PUT(&b, ",\"detail\":{") < 0)
                goto done;
            while (PyDict_Next(detail, &pos, &k, &v)) {
                if (!PyUnicode_CheckExact(k)) {
                    PyErr_SetString(PyExc_ValueError, "encode: detail keys are str");
                    goto done;
                }
                if (PyUnicode_CompareWithASCIIString(k, "msg_id") == 0 ||
                    PyUnicode_CompareWithASCIIString(k, "cell_id") == 0)
                    continue;  /* the execution's ids, below, as _materialize sets them */
                if (put_str(&b, k, escape) < 0 || PUT(&b, ":") < 0 || put_value(&b, v, dump, escape) < 0 ||
                    PUT(&b, ",") < 0)
                    goto done;
            }
            if (put_ids(&b, PyTuple_GET_ITEM(it, 3), dump, escape) < 0 || PUT(&b, "}}") < 0)
                goto done;
        }
        else if (PyUnicode_CheckExact(tag) && PyUnicode_GET_LENGTH(tag) == 1 && PyUnicode_READ_CHAR(tag, 0) == 'r') {
            if (buf_put_text(&b, PyObject_CallOneArg(record_text, PyTuple_GET_ITEM(it, 1))) < 0)
                goto done;
        }
        else {
            PyErr_SetString(PyExc_ValueError, "encode: an item that is not an open, a data open or a record");
            goto done;
        }
    }
    if (PUT(&b, "]}") < 0)
        goto done;
    result = PyBytes_FromStringAndSize(b.p, b.n);
done:
    PyMem_Free(b.p);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS, "Add the C audit hook (once per process)."},
    {"write_through", set_write_through, METH_NOARGS, "From now on, hand every recorded event to the handler."},
    {"encode", encode, METH_VARARGS, "The POST body of buffered items: encode(items, dump, escape, record_text)."},
    {"stats", stats, METH_NOARGS, "Whether the hook is installed; opens taken by the fast path; events handed on."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hook", "The audit hook's hot path in C (see ngp_research.kernel.auditor).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__hook(void)
{
    return PyModule_Create(&module);
}
