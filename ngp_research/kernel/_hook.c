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
#include <strings.h>
#include <math.h>
#include <errno.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/un.h>
#include <dlfcn.h>
#if __has_include(<sqlite3.h>)
#include <sqlite3.h>
#define NGP_SQLITE 1
#endif

#define MAX_PREFIXES 64
/* Linux opens no longer path (auditor.PATH_MAX); longer ones, and longer detail values, go to the Python side */
#define PATH_TEXT_MAX 4096
/* an execution id's characters (auditor.ID_MAX) and a data open's detail text (auditor.DATA_DETAIL_FAST) */
#define ID_TEXT_MAX 256
#define DATA_DETAIL_FAST 16384
/* the bytes one run of opens, and one request, hold at most (the service takes 16 MiB per request) */
#define RUN_BYTES_MAX (1 << 20)
#define POST_BYTES_MAX (8 << 20)
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

typedef struct {
    char *p;
    Py_ssize_t n, cap;
    int on_stack;  /* p is the caller's array: copied to the heap when it grows */
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
    p = b->on_stack ? PyMem_RawMalloc((size_t)want)  /* raw: the sender thread frees without the GIL */
                    : PyMem_RawRealloc(b->p, (size_t)want);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (b->on_stack) {
        memcpy(p, b->p, (size_t)b->n);
        b->on_stack = 0;
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


/* {"action":"file.open","detail":{"event":"open","mode":M,"flags":F,"msg_id":I0,"cell_id":I1}, */
static int
put_open_head(buf_t *b, PyObject *mode, PyObject *flags, PyObject *ids, PyObject *dump, PyObject *escape)
{
    return (PUT(b, "{\"action\":\"file.open\",\"detail\":{\"event\":\"open\",\"mode\":") < 0 ||
            put_value(b, mode, dump, escape) < 0 || PUT(b, ",\"flags\":") < 0 ||
            put_value(b, flags, dump, escape) < 0 || PUT(b, ",") < 0 || put_ids(b, ids, dump, escape) < 0 ||
            PUT(b, "},") < 0) ? -1 : 0;
}

/* the data.open record of a library's open: the detail's items, then the execution's ids */
static int
put_data(buf_t *b, PyObject *path, PyObject *detail, PyObject *ids, PyObject *dump, PyObject *escape)
{
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    if (PUT(b, "{\"action\":\"data.open\",\"path\":") < 0 || put_value(b, path, dump, escape) < 0 ||
        PUT(b, ",\"detail\":{") < 0)
        return -1;
    while (PyDict_Next(detail, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k)) {
            PyErr_SetString(PyExc_ValueError, "encode: detail keys are str");
            return -1;
        }
        if (PyUnicode_CompareWithASCIIString(k, "msg_id") == 0 || PyUnicode_CompareWithASCIIString(k, "cell_id") == 0)
            continue;  /* the execution's ids, below, as _materialize sets them */
        if (put_str(b, k, escape) < 0 || PUT(b, ":") < 0 || put_value(b, v, dump, escape) < 0 || PUT(b, ",") < 0)
            return -1;
    }
    return (put_ids(b, ids, dump, escape) < 0 || PUT(b, "}}") < 0) ? -1 : 0;
}


/* -- the C sender: a queue of encoded records and a thread that delivers them without the GIL -------
 *
 * start_sender(...) switches the fast paths from the auditor's list to this queue: a plain open is
 * JSON-encoded into it (consecutive opens with the same mode, flags and execution share one record
 * with "paths"), a library's data open too, and put() adds any other record the Python side
 * encoded. A pthread that never takes the GIL waits ``linger`` seconds after the queue becomes
 * non-empty (or until ``batch`` records wait, or wait() is called), POSTs the records at the front
 * (at most ``max_post`` per request) over a kept-alive connection, and drops them only when the
 * service acknowledged exactly as many as were sent. A failure is kept in ``last_error`` and retried
 * with backoff; the records stay. wait(timeout) releases the GIL until everything queued before the
 * call is acknowledged, and returns None or why not.
 *
 * Only the last segment can be an open run ("paths":[... without its closing "]}"); the sender closes
 * it when it takes it, and ``out`` always has two spare bytes for that (the sender never allocates
 * Python memory). In a forked child the queue is emptied (its records are the parent's to deliver)
 * and there is no sender: the auditor delivers from Python there.
 */

typedef struct {
    Py_ssize_t end;  /* offset in out just past this segment */
    long count;      /* accesses it stands for */
} seg_t;

static int queue_mode = 0;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv_data, cv_ack;
static buf_t out = {NULL, 0, 0, 0};
static seg_t *segs = NULL;
static Py_ssize_t nsegs = 0, segcap = 0;
static int run_open = 0;
static long long queued_total = 0, acked_total = 0;
static long q_pending = 0, q_batch = 500, q_max_post = 2000, q_capacity = 10000;
static double q_linger = 0.005, q_timeout = 5.0;
static int flush_requested = 0, sender_running = 0;
static unsigned long q_posts = 0, q_failures = 0;
static char last_error[256] = "";
static char q_host[108], q_port[16];  /* a host and port, or a unix socket path ("/...") and "" */
static char *q_head = NULL;
static size_t q_head_len = 0;
static int q_fd = -1;
static dev_t q_fd_dev;  /* the connected socket's identity: a cell that dup2()s another socket over */
static ino_t q_fd_ino;  /* q_fd (a fake service answering itself) is caught before and after each POST */
static PyObject *q_dump = NULL, *q_escape = NULL;  /* json.dumps, encode_basestring_ascii (GIL only) */
static PyObject *run_mode = NULL, *run_flags = NULL, *run_ids = NULL;  /* the open run's keys (GIL only) */
static buf_t run_head = {NULL, 0, 0, 0};  /* its encoded head (GIL only) */

/* A buffer on the caller's stack (no allocation per open). Not a static one: encoding a value can run
 * Python code (json.dumps), during which another thread can take the GIL and encode its own open. */
#define STACK_BUF(name, size) char name##_space[size]; buf_t name = {name##_space, 0, size, 1}

static void
buf_release(buf_t *b)
{
    if (!b->on_stack)
        PyMem_RawFree(b->p);
}

static void
deadline_in(struct timespec *ts, double seconds)
{
    if (!(seconds >= 0))
        seconds = 0;
    if (seconds > 86400.0 * 365)
        seconds = 86400.0 * 365;
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += (time_t)seconds;
    ts->tv_nsec += (long)((seconds - (double)(time_t)seconds) * 1e9);
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec += 1;
        ts->tv_nsec -= 1000000000L;
    }
}

/* under mu, GIL held: room for one more segment and ``more`` bytes (plus the two spare) */
static int
q_reserve(Py_ssize_t more)
{
    if (nsegs == segcap) {
        Py_ssize_t cap = segcap ? 2 * segcap : 256;
        seg_t *p = PyMem_RawRealloc(segs, (size_t)cap * sizeof(seg_t));
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        segs = p;
        segcap = cap;
    }
    return buf_grow(&out, more + 4);  /* 2 to close the open run first, 2 spare after */
}

/* under mu: close the open run, if any ("]}" into the spare bytes) */
static void
q_close_run(void)
{
    if (run_open) {
        out.p[out.n++] = ']';
        out.p[out.n++] = '}';
        segs[nsegs - 1].end = out.n;
        run_open = 0;
    }
}

/* under mu: a record is queued; wake the sender at the first and at the batch-th */
static void
q_added(long count)
{
    q_pending += count;
    queued_total += count;
    if (q_pending == count || (q_pending >= q_batch && q_pending - count < q_batch))
        pthread_cond_signal(&cv_data);
}

/* under mu, GIL held: a whole record as a new segment */
static int
q_put_segment(const char *text, Py_ssize_t n, long count)
{
    if (q_reserve(n) < 0)
        return -1;
    q_close_run();
    memcpy(out.p + out.n, text, (size_t)n);
    out.n += n;
    segs[nsegs].end = out.n;
    segs[nsegs].count = count;
    nsegs++;
    q_added(count);
    return 0;
}

/* 1 when the exact int ``v`` fits in 64 bits */
static int
fits_64(PyObject *v)
{
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return overflow == 0;
}

/* 1 when an open's mode, flags and execution ids are plain values whose comparison and release run no
 * user code (a forged ``sys.audit("open", ...)`` can pass anything): exact str or None, exact int,
 * a 2-tuple of exact str or None. Anything else goes to the Python handler. */
static int
plain_keys(PyObject *mode, PyObject *flags, PyObject *ids)
{
    PyObject *a, *b;
    if (!(mode == Py_None || (PyUnicode_CheckExact(mode) && PyUnicode_GET_LENGTH(mode) <= 64)) ||
        !(flags == Py_None || (PyLong_CheckExact(flags) && fits_64(flags))))
        return 0;  /* a mode no open takes (a forged event): the Python side records it, cut to size */
    if (!PyTuple_CheckExact(ids) || PyTuple_GET_SIZE(ids) != 2)
        return 0;
    a = PyTuple_GET_ITEM(ids, 0);
    b = PyTuple_GET_ITEM(ids, 1);
    return (a == Py_None || (PyUnicode_CheckExact(a) && PyUnicode_GET_LENGTH(a) <= ID_TEXT_MAX)) &&
           (b == Py_None || (PyUnicode_CheckExact(b) && PyUnicode_GET_LENGTH(b) <= ID_TEXT_MAX));
}

static int
same_or_not(PyObject *a, PyObject *b)
{
    int eq = a == NULL ? 0 : same(a, b);
    if (eq < 0) {
        PyErr_Clear();
        return 0;
    }
    return eq;
}

/* the fast path of a plain open in queue mode: 1 queued, 0 hand it on (queue full), -1 error.
 * ``text`` is the path's UTF-8 when it needs no JSON escaping (else NULL: encoded from ``path``). */
static int
queue_open(PyObject *path, const char *text, Py_ssize_t text_len, PyObject *mode, PyObject *flags, PyObject *ids)
{
    STACK_BUF(pt, 1024);
    STACK_BUF(head, 512);
    PyObject *old_mode = NULL, *old_flags = NULL, *old_ids = NULL;
    int keys_same, r = -1;
    if (text != NULL && text_len + 3 <= pt.cap) {
        pt.p[0] = ',';
        pt.p[1] = '"';
        memcpy(pt.p + 2, text, (size_t)text_len);
        pt.p[text_len + 2] = '"';
        pt.n = text_len + 3;
    }
    else if (PUT(&pt, ",") < 0 || put_value(&pt, path, q_dump, q_escape) < 0)
        goto done;
    keys_same = same_or_not(run_mode, mode) && same_or_not(run_flags, flags) && same_or_not(run_ids, ids);
    if (!keys_same) {  /* a new run: its head first (this can run json code), then keys and head swapped in */
        if (put_open_head(&head, mode, flags, ids, q_dump, q_escape) < 0 || PUT(&head, "\"paths\":[") < 0)
            goto done;
        old_mode = run_mode; old_flags = run_flags; old_ids = run_ids;  /* released after the lock */
        run_mode = run_flags = run_ids = NULL;  /* no stale keys if the head cannot be kept */
        run_head.n = 0;
        if (buf_put(&run_head, head.p, head.n) < 0)
            goto done;
        Py_INCREF(mode); Py_INCREF(flags); Py_INCREF(ids);
        run_mode = mode; run_flags = flags; run_ids = ids;
    }
    pthread_mutex_lock(&mu);
    if (!keys_same)
        q_close_run();  /* the open run has other keys: nothing is added to it from now on */
    if (q_pending >= q_capacity) {
        r = 0;
    }
    else if (keys_same && run_open && segs[nsegs - 1].count < q_max_post &&
             out.n - (nsegs > 1 ? segs[nsegs - 2].end : 0) < RUN_BYTES_MAX) {
        if (buf_grow(&out, pt.n + 2) == 0) {
            memcpy(out.p + out.n, pt.p, (size_t)pt.n);
            out.n += pt.n;
            segs[nsegs - 1].end = out.n;
            segs[nsegs - 1].count++;
            q_added(1);
            r = 1;
        }
    }
    else if (q_reserve(run_head.n + pt.n - 1) == 0) {
        q_close_run();
        memcpy(out.p + out.n, run_head.p, (size_t)run_head.n);
        out.n += run_head.n;
        memcpy(out.p + out.n, pt.p + 1, (size_t)pt.n - 1);  /* without its comma */
        out.n += pt.n - 1;
        segs[nsegs].end = out.n;
        segs[nsegs].count = 1;
        nsegs++;
        run_open = 1;
        q_added(1);
        r = 1;
    }
    pthread_mutex_unlock(&mu);
done:
    Py_XDECREF(old_mode);
    Py_XDECREF(old_flags);
    Py_XDECREF(old_ids);
    buf_release(&pt);
    buf_release(&head);
    if (r == 1)
        fast++;
    return r;
}

/* the fast path of a library's data open in queue mode: 1 queued, 0 hand it on, -1 error */
static int
queue_data(PyObject *path, PyObject *detail, PyObject *ids)
{
    STACK_BUF(b, 1024);
    int r = -1;
    if (put_data(&b, path, detail, ids, q_dump, q_escape) < 0)
        goto done;
    pthread_mutex_lock(&mu);
    r = q_pending >= q_capacity ? 0 : (q_put_segment(b.p, b.n, 1) < 0 ? -1 : 1);
    pthread_mutex_unlock(&mu);
done:
    buf_release(&b);
    if (r == 1)
        fast++;
    return r;
}

/* -- the sender thread (no GIL, no Python API below this line until the module functions) -- */

static void
q_close_fd(void)
{
    if (q_fd >= 0) {
        close(q_fd);
        q_fd = -1;
    }
}

static int
q_connect(char *err, size_t errlen)
{
    struct addrinfo hints, *res = NULL;
    struct sockaddr_un un;
    int fd, rc, one = 1, local = q_host[0] == '/';  /* a unix socket path: the service's own socket */
    struct timeval tv;
    if (local) {
        memset(&un, 0, sizeof un);
        un.sun_family = AF_UNIX;
        memcpy(un.sun_path, q_host, strlen(q_host));  /* shorter than sun_path: checked in start_sender */
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    }
    else {
        memset(&hints, 0, sizeof hints);
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
        rc = getaddrinfo(q_host, q_port, &hints, &res);
        if (rc != 0 || res == NULL) {
            snprintf(err, errlen, "the audit service's address %s:%s: %s", q_host, q_port, gai_strerror(rc));
            return -1;
        }
        fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
    }
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        if (res != NULL)
            freeaddrinfo(res);
        return -1;
    }
    tv.tv_sec = (time_t)q_timeout;
    tv.tv_usec = (suseconds_t)((q_timeout - (double)tv.tv_sec) * 1e6);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (!local)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    do {
        rc = local ? connect(fd, (struct sockaddr *)&un, sizeof un) : connect(fd, res->ai_addr, res->ai_addrlen);
    } while (rc < 0 && errno == EINTR);
    if (res != NULL)
        freeaddrinfo(res);
    if (rc < 0) {
        snprintf(err, errlen, "ConnectionRefusedError: [Errno %d] %s", errno, strerror(errno));
        close(fd);
        return -1;
    }
    {
        struct stat st;
        if (fstat(fd, &st) < 0) {
            snprintf(err, errlen, "fstat: %s", strerror(errno));
            close(fd);
            return -1;
        }
        q_fd_dev = st.st_dev;
        q_fd_ino = st.st_ino;
    }
    q_fd = fd;
    return 0;
}

/* 1 when q_fd is still the socket q_connect made; else it is forgotten (not closed: the number is
 * someone else's now) and ``err`` says so */
static int
fd_is_ours(char *err, size_t errlen)
{
    struct stat st;
    if (fstat(q_fd, &st) == 0 && st.st_dev == q_fd_dev && st.st_ino == q_fd_ino)
        return 1;
    q_fd = -1;
    snprintf(err, errlen, "the audit connection's socket was replaced or closed (tampering?); "
             "the records stay and go out on a new connection");
    return 0;
}

static int
send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static const char *
find_header(const char *head, size_t n, const char *name)
{
    size_t len = strlen(name), i;
    for (i = 0; i + len + 2 < n; i++)
        if (head[i] == '\n' && strncasecmp(head + i + 1, name, len) == 0 && head[i + 1 + len] == ':')
            return head + i + 2 + len;
    return NULL;
}

#define RESPONSE_MAX 65536

/* 0 answered (status, acknowledged count); 1 the connection closed before any byte; -1 failed */
static int
read_response(int *status, long *ack, int *closing, char *err, size_t errlen)
{
    static char r[RESPONSE_MAX + 1];
    size_t n = 0, head_len = 0;
    long length = -1;
    const char *h, *body, *a;
    char *end;
    for (;;) {
        ssize_t got = recv(q_fd, r + n, RESPONSE_MAX - n, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (n == 0 && (got == 0 || (got < 0 && (errno == ECONNRESET || errno == EPIPE))))
            return 1;  /* closed before answering: on a kept-alive connection, the caller tries a new one */
        if (got <= 0) {
            snprintf(err, errlen, got == 0 ? "RemoteDisconnected: the audit service closed the connection"
                     : (errno == EAGAIN || errno == EWOULDBLOCK) ? "TimeoutError: timed out" : "OSError: %s",
                     strerror(errno));
            return -1;
        }
        n += (size_t)got;
        r[n] = '\0';
        if (head_len == 0) {
            char *e = strstr(r, "\r\n\r\n");
            if (e == NULL) {
                if (n == RESPONSE_MAX) {
                    snprintf(err, errlen, "the audit service's answer is too large");
                    return -1;
                }
                continue;
            }
            head_len = (size_t)(e - r) + 4;
            if (strncmp(r, "HTTP/1.", 7) != 0 || n < 12 || sscanf(r + 9, "%3d", status) != 1) {
                snprintf(err, errlen, "BadStatusLine: the audit service's answer is not HTTP");
                return -1;
            }
            if (find_header(r, head_len, "transfer-encoding") != NULL) {
                snprintf(err, errlen, "the audit service's answer is not sized");
                return -1;
            }
            h = find_header(r, head_len, "content-length");
            if (h == NULL || (length = strtol(h, NULL, 10)) < 0 || (size_t)length > RESPONSE_MAX - head_len) {
                snprintf(err, errlen, "the audit service's answer has no usable Content-Length");
                return -1;
            }
            h = find_header(r, head_len, "connection");
            *closing = h != NULL && strncasecmp(h + strspn(h, " \t"), "close", 5) == 0;
        }
        if (n >= head_len + (size_t)length)
            break;
    }
    *ack = -1;
    body = r + head_len;
    r[head_len + (size_t)length] = '\0';
    a = strstr(body, "\"acknowledged\"");
    if (a != NULL) {
        a += strlen("\"acknowledged\"");
        a += strspn(a, " \t");
        if (*a == ':') {
            *ack = strtol(a + 1, &end, 10);
            if (end == a + 1)
                *ack = -1;
        }
    }
    return 0;
}

/* one POST of ``body`` (``count`` accesses): 0 when acknowledged, else -1 with ``err`` */
static int
exchange(const char *body, size_t len, long count, char *err, size_t errlen)
{
    int attempt;
    for (attempt = 0; attempt < 2; attempt++) {
        int reused = q_fd >= 0, status = 0, closing = 0, rc;
        long ack = -1;
        if (q_fd < 0 && q_connect(err, errlen) < 0)
            return -1;
        if (!fd_is_ours(err, errlen))
            return -1;
        if (send_all(q_fd, body, len) < 0) {
            int e = errno;
            q_close_fd();
            if (reused && attempt == 0 && (e == EPIPE || e == ECONNRESET))
                continue;  /* a kept-alive connection the service closed: once more on a new one */
            snprintf(err, errlen, "OSError: send: %s", strerror(e));
            return -1;
        }
        rc = read_response(&status, &ack, &closing, err, errlen);
        if (rc == 1) {
            q_close_fd();
            if (reused && attempt == 0)
                continue;
            snprintf(err, errlen, "RemoteDisconnected: the audit service closed the connection");
            return -1;
        }
        if (!fd_is_ours(err, errlen))
            return -1;  /* swapped while the request was out: its answer is not the service's */
        if (rc < 0 || closing)
            q_close_fd();
        if (rc < 0)
            return -1;
        if (status != 200) {
            snprintf(err, errlen, "HTTP %d", status);
            return -1;
        }
        if (ack != count) {
            snprintf(err, errlen, "the service acknowledged %ld of %ld records", ack, count);
            return -1;
        }
        return 0;
    }
    snprintf(err, errlen, "connection closed");
    return -1;
}

/* under mu: the request for the segments at the front (at most q_max_post accesses and POST_BYTES_MAX
 * bytes, at least one segment) into a new malloc'd buffer; *k segments, *count accesses */
static char *
take(size_t *len, Py_ssize_t *k, long *count)
{
    Py_ssize_t i = 0, bytes;
    long c = 0;
    size_t json_len, n;
    char digits[32], *req, *p;
    while (i < nsegs && (i == 0 || (c + segs[i].count <= q_max_post && segs[i].end <= POST_BYTES_MAX))) {
        if (i == nsegs - 1)
            q_close_run();  /* the open run goes out whole: later opens start a new one */
        c += segs[i].count;
        i++;
    }
    bytes = segs[i - 1].end;
    json_len = strlen("{\"records\":[") + (size_t)bytes + (size_t)(i - 1) + 2;
    snprintf(digits, sizeof digits, "%zu\r\n\r\n", json_len);
    n = q_head_len + strlen(digits) + json_len;
    req = malloc(n);
    if (req == NULL)
        return NULL;
    p = req;
    memcpy(p, q_head, q_head_len); p += q_head_len;
    memcpy(p, digits, strlen(digits)); p += strlen(digits);
    memcpy(p, "{\"records\":[", 12); p += 12;
    for (Py_ssize_t j = 0; j < i; j++) {
        Py_ssize_t start = j == 0 ? 0 : segs[j - 1].end;
        if (j > 0)
            *p++ = ',';
        memcpy(p, out.p + start, (size_t)(segs[j].end - start));
        p += segs[j].end - start;
    }
    *p++ = ']';
    *p++ = '}';
    *len = n;
    *k = i;
    *count = c;
    return req;
}

/* under mu: the first k segments (count accesses) were acknowledged */
static void
drop(Py_ssize_t k, long count)
{
    Py_ssize_t bytes = segs[k - 1].end, j;
    memmove(out.p, out.p + bytes, (size_t)(out.n - bytes));
    out.n -= bytes;
    for (j = k; j < nsegs; j++) {
        segs[j - k].end = segs[j].end - bytes;
        segs[j - k].count = segs[j].count;
    }
    nsegs -= k;
    q_pending -= count;
    acked_total += count;
}

static void *
sender_main(void *unused)
{
    double backoff = 0.1;
    struct timespec until;
    (void)unused;
    pthread_mutex_lock(&mu);
    for (;;) {
        char err[sizeof last_error];
        char *req;
        size_t len;
        Py_ssize_t k;
        long count;
        int rc;
        while (nsegs == 0)
            pthread_cond_wait(&cv_data, &mu);
        if (!flush_requested && q_pending < q_batch && q_linger > 0) {  /* let a burst collect */
            deadline_in(&until, q_linger);
            while (!flush_requested && q_pending < q_batch)
                if (pthread_cond_timedwait(&cv_data, &mu, &until) == ETIMEDOUT)
                    break;
        }
        req = take(&len, &k, &count);
        if (req == NULL) {
            snprintf(last_error, sizeof last_error, "MemoryError");
            q_failures++;
            pthread_cond_broadcast(&cv_ack);
            deadline_in(&until, 1.0);
            pthread_cond_timedwait(&cv_data, &mu, &until);
            continue;
        }
        pthread_mutex_unlock(&mu);
        err[0] = '\0';
        rc = exchange(req, len, count, err, sizeof err);
        free(req);
        pthread_mutex_lock(&mu);
        if (rc == 0) {
            drop(k, count);
            q_posts++;
            last_error[0] = '\0';
            backoff = 0.1;
            if (nsegs == 0)
                flush_requested = 0;
            pthread_cond_broadcast(&cv_ack);
        }
        else {
            memcpy(last_error, err, sizeof last_error);
            q_failures++;
            flush_requested = 0;  /* each wait() asks for one more try, not a loop without backoff */
            pthread_cond_broadcast(&cv_ack);
            deadline_in(&until, 0.02);  /* at least this long between failed tries, whoever asks */
            while (pthread_cond_timedwait(&cv_data, &mu, &until) != ETIMEDOUT)
                ;
            deadline_in(&until, backoff);
            backoff = backoff * 2 > 2.0 ? 2.0 : backoff * 2;
            while (!flush_requested)  /* a wait() cuts the backoff short: one more try now */
                if (pthread_cond_timedwait(&cv_data, &mu, &until) == ETIMEDOUT)
                    break;
        }
    }
    return NULL;
}

/* -- module functions of the queue ---------------------------------------------------------------- */

static void
queue_after_fork_in_child(void)
{
    /* the parent's records are the parent's to deliver; this process has no sender thread */
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&cv_data, NULL);
    pthread_cond_init(&cv_ack, NULL);
    out.n = 0;
    nsegs = 0;
    run_open = 0;
    q_pending = 0;
    acked_total = queued_total;
    sender_running = 0;
    if (q_fd >= 0) {
        close(q_fd);
        q_fd = -1;
    }
}

static PyObject *
start_sender(PyObject *self, PyObject *args)
{
    const char *host, *port;
    Py_buffer head;
    double linger, timeout;
    Py_ssize_t bat, max_post, cap;
    PyObject *dump, *escape;
    pthread_condattr_t attr;
    pthread_t thread;
    sigset_t all, old;
    int rc;
    (void)self;
    if (!PyArg_ParseTuple(args, "ssy*dnnndOO", &host, &port, &head, &linger, &bat, &max_post, &cap, &timeout,
                          &dump, &escape))
        return NULL;
    if (queue_mode || installed) {
        PyBuffer_Release(&head);
        PyErr_SetString(PyExc_RuntimeError, "start the sender once, before the hook is installed");
        return NULL;
    }
    if (strlen(host) >= sizeof q_host || (host[0] == '/' && strlen(host) >= sizeof ((struct sockaddr_un *)0)->sun_path) ||
        strlen(port) >= sizeof q_port || bat < 1 || max_post < 1 || cap < 1 ||
        timeout <= 0 || linger < 0) {
        PyBuffer_Release(&head);
        PyErr_SetString(PyExc_ValueError, "start_sender: bad arguments");
        return NULL;
    }
    q_head = PyMem_RawMalloc((size_t)head.len);
    if (q_head == NULL) {
        PyBuffer_Release(&head);
        return PyErr_NoMemory();
    }
    memcpy(q_head, head.buf, (size_t)head.len);
    q_head_len = (size_t)head.len;
    PyBuffer_Release(&head);
    strcpy(q_host, host);
    strcpy(q_port, port);
    q_linger = linger;
    q_batch = (long)bat;
    q_max_post = (long)max_post;
    q_capacity = (long)cap;
    q_timeout = timeout;
    Py_INCREF(dump); Py_INCREF(escape);
    q_dump = dump;
    q_escape = escape;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&cv_data, &attr);
    pthread_cond_init(&cv_ack, &attr);
    pthread_condattr_destroy(&attr);
    if (buf_grow(&out, 4096) < 0)
        return NULL;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);  /* signals stay the interpreter's main thread's */
    rc = pthread_create(&thread, NULL, sender_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_detach(thread);
    if (pthread_atfork(NULL, NULL, queue_after_fork_in_child) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    sender_running = 1;
    queue_mode = 1;
    Py_RETURN_NONE;
}

static PyObject *
queue_put(PyObject *self, PyObject *record)
{
    PyObject *text;
    const char *t;
    Py_ssize_t n;
    int rc;
    (void)self;
    if (!queue_mode) {
        PyErr_SetString(PyExc_RuntimeError, "put: the C sender is not running");
        return NULL;
    }
    if (!PyDict_CheckExact(record)) {
        PyErr_SetString(PyExc_TypeError, "put: one record, a dict");
        return NULL;
    }
    /* encoded here, by the json.dumps captured at start: one JSON object, whatever the caller passes
     * (text from outside could open a record that swallows the ones after it) */
    text = PyObject_CallOneArg(q_dump, record);
    if (text == NULL)
        return NULL;
    t = PyUnicode_Check(text) ? PyUnicode_AsUTF8AndSize(text, &n) : NULL;
    if (t == NULL || n < 2 || t[0] != '{') {
        Py_DECREF(text);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "put: the record did not encode as a JSON object");
        return NULL;
    }
    pthread_mutex_lock(&mu);
    rc = q_put_segment(t, n, 1);
    pthread_mutex_unlock(&mu);
    Py_DECREF(text);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
queue_wait(PyObject *self, PyObject *arg)
{
    double t = PyFloat_AsDouble(arg);
    char err[sizeof last_error];
    int rc = 0;
    (void)self;
    if (t == -1.0 && PyErr_Occurred())
        return NULL;
    if (!queue_mode) {
        PyErr_SetString(PyExc_RuntimeError, "wait: the C sender is not running");
        return NULL;
    }
    err[0] = '\0';
    pthread_mutex_lock(&mu);
    rc = acked_total >= queued_total;  /* nothing waits (each cell's end, usually): no GIL round trip */
    pthread_mutex_unlock(&mu);
    if (rc)
        Py_RETURN_NONE;
    rc = 0;
    Py_BEGIN_ALLOW_THREADS
    {
        struct timespec until;
        long long target;
        unsigned long f0;
        deadline_in(&until, t > 0 ? t : 0);
        pthread_mutex_lock(&mu);
        target = queued_total;
        f0 = q_failures;
        if (acked_total < target) {
            flush_requested = 1;
            pthread_cond_signal(&cv_data);
        }
        while (acked_total < target) {
            if (!sender_running) {
                snprintf(err, sizeof err, "no audit sender runs in this process");
                rc = 1;
                break;
            }
            if (q_failures != f0) {
                memcpy(err, last_error, sizeof err);
                rc = 1;
                break;
            }
            if (pthread_cond_timedwait(&cv_ack, &mu, &until) == ETIMEDOUT && acked_total < target) {
                snprintf(err, sizeof err, "the audit service did not take the records in time");
                rc = 1;
                break;
            }
        }
        pthread_mutex_unlock(&mu);
    }
    Py_END_ALLOW_THREADS
    if (rc == 0)
        Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8(err, (Py_ssize_t)strlen(err), "replace");
}

static PyObject *
queue_status(PyObject *self, PyObject *unused)
{
    long pending;
    long long queued, acked;
    unsigned long posts, failures;
    int running;
    char error[sizeof last_error];
    (void)self; (void)unused;
    pthread_mutex_lock(&mu);  /* copies only: building Python objects under mu could run a finalizer
                                 that opens a file and takes mu again in this thread */
    pending = q_pending; queued = queued_total; acked = acked_total; posts = q_posts; failures = q_failures;
    running = sender_running;
    memcpy(error, last_error, sizeof error);
    pthread_mutex_unlock(&mu);
    return Py_BuildValue("{s:l,s:L,s:L,s:k,s:k,s:s,s:O}", "pending", pending, "queued", queued, "acknowledged", acked,
                         "posts", posts, "failures", failures, "last_error", error,
                         "running", running ? Py_True : Py_False);
}

/* One pass over an absolute path's UTF-8: -1 when it is not plain (holds "/." or "//": the Python side
 * normalises it), else 1 when JSON can take it as it is (printable ASCII, no quote or backslash), 0
 * when it needs escaping. */
static int
scan_path(const char *s, Py_ssize_t n)
{
    int plain_text = 1;
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '/') {
            if (i + 1 < n && (s[i + 1] == '.' || s[i + 1] == '/'))
                return -1;
        }
        else if (c < 0x20 || c >= 0x7f || c == '"' || c == '\\')
            plain_text = 0;
    }
    return plain_text;
}

static int append(PyObject *item, Py_ssize_t len);

/* 1 when the path starts in /proc or /dev (a process's working folder, open files or root, /dev/stdin: they
 * can lead anywhere, and the Python side reads where) */
static int
via_process(const char *s, Py_ssize_t n)
{
    return (n >= 6 && memcmp(s, "/proc/", 6) == 0) || (n >= 5 && memcmp(s, "/dev/", 5) == 0);
}

/* 1: appended; 0: not a plain open (hand it on); -1: error */
static int
fast_open(PyObject *args)
{
    PyObject *path, *item;
    const char *s;
    Py_ssize_t n, len;
    int plain_text;

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
    if (n == 0 || n > PATH_TEXT_MAX || s[0] != '/' || (plain_text = scan_path(s, n)) < 0)
        return 0;  /* a path longer than any Linux opens: the Python side records it cut (auditor.bounded) */
    if (is_ignored(s, n))
        return 1;
    if (via_process(s, n))
        return 0;  /* through /proc or /dev: the Python side reads where it leads */
    if (PyList_GET_SIZE(current) != 1)
        return 0;  /* tampered with: the handler fails closed */
    if (!plain_keys(PyTuple_GET_ITEM(args, 1), PyTuple_GET_ITEM(args, 2), PyList_GET_ITEM(current, 0)))
        return 0;  /* comparing or releasing them could run user code: the handler makes them plain */
    if (queue_mode)
        return queue_open(path, plain_text ? s : NULL, n, PyTuple_GET_ITEM(args, 1), PyTuple_GET_ITEM(args, 2),
                          PyList_GET_ITEM(current, 0));
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

/* 1 when every key is an exact str and every value an exact str, int, float, bool or None, with at most
 * DATA_DETAIL_FAST characters of text in all (more: the Python side cuts the record to a size the service takes) */
static int
plain_dict(PyObject *d)
{
    Py_ssize_t pos = 0, text = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k))
            return 0;
        if (!(v == Py_None || PyUnicode_CheckExact(v) || PyLong_CheckExact(v) || PyFloat_CheckExact(v) || PyBool_Check(v)))
            return 0;
        if (PyLong_CheckExact(v) && !fits_64(v))
            return 0;  /* a huge int is as long as a huge string */
        text += PyUnicode_GET_LENGTH(k) + (PyUnicode_CheckExact(v) ? PyUnicode_GET_LENGTH(v) : 24);
        if (text > DATA_DETAIL_FAST)
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
    if (n == 0 || n > PATH_TEXT_MAX || s[0] != '/' || memmem(s, (size_t)n, "/.", 2) != NULL ||
        memmem(s, (size_t)n, "//", 2) != NULL || via_process(s, n))
        return 0;
    if (PyList_GET_SIZE(current) != 1 || !plain_dict(detail))
        return 0;  /* values that are not plain: the handler makes them plain without running user code */
    if (queue_mode)
        return queue_data(path, detail, PyList_GET_ITEM(current, 0));
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
set_write_through(PyObject *self, PyObject *args)
{
    int on = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "|p", &on))
        return NULL;
    if (!on) {  /* back to the queue: only where its sender thread runs (never in a forked child) */
        if (!queue_mode || !sender_running) {
            PyErr_SetString(PyExc_RuntimeError, "no audit sender thread in this process: events stay with the handler");
            return NULL;
        }
        write_through = 0;
        Py_RETURN_NONE;
    }
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

static PyObject *
encode(PyObject *self, PyObject *args)
{
    PyObject *items, *dump, *escape, *record_text, *seq, *result = NULL;
    Py_ssize_t i, j, n;
    buf_t b = {NULL, 0, 0, 0};
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
            if (put_open_head(&b, mode, flags, ids, dump, escape) < 0 ||
                (j - i == 1 ? PUT(&b, "\"path\":") : PUT(&b, "\"paths\":[")) < 0)
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
            if (put_data(&b, PyTuple_GET_ITEM(it, 1), PyTuple_GET_ITEM(it, 2), PyTuple_GET_ITEM(it, 3), dump, escape) < 0)
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
    PyMem_RawFree(b.p);
    Py_DECREF(seq);
    return result;
}

/* -- SQLite's own opens ----------------------------------------------------------------------------
 *
 * SQLite opens files in C. Python raises ``sqlite3.connect`` for a connection's database, but nothing
 * for a database a statement opens: ``ATTACH DATABASE 'f'``, ``VACUUM INTO 'f'``. watch_sqlite()
 * puts a VFS in front of every VFS the process's SQLite has (same names, so ``?vfs=`` in a URI picks
 * a wrapped one too; the default stays the default). Each passes every call on to the VFS it wraps;
 * its xOpen first raises the audit event ``ngp.sqlite3.open`` (path, flags) for a database file
 * (SQLITE_OPEN_MAIN_DB: a connection's, an attached one), taking the GIL as Python's own SQLite
 * callbacks do. When a hook refuses the event, the open fails (SQLITE_CANTOPEN): nothing is read
 * unrecorded. A connection's own database was recorded at ``sqlite3.connect``: sqlite_expect(path)
 * names it for the calling thread, and its open is not raised a second time.
 *
 * The SQLite is the shared library the interpreter's _sqlite3 module loaded (libsqlite3.so.0, found
 * with RTLD_NOLOAD); where _sqlite3 has its own copy linked in, nothing is wrapped and watch_sqlite()
 * returns False.
 */
#ifdef NGP_SQLITE
typedef struct {
    sqlite3_vfs base;
    sqlite3_vfs *orig;
} ngp_vfs_t;

#define ORIG(v) (((ngp_vfs_t *)(v))->orig)
#if PY_VERSION_HEX >= 0x030D0000
#define IS_FINALIZING() Py_IsFinalizing()
#else
#define IS_FINALIZING() _Py_IsFinalizing()
#endif
static __thread char *sqlite_expected = NULL;  /* the database the thread's sqlite3.connect recorded */

static int
vfs_open(sqlite3_vfs *v, const char *name, sqlite3_file *f, int flags, int *out)
{
    sqlite3_vfs *o = ORIG(v);
    if (name != NULL && (flags & SQLITE_OPEN_MAIN_DB)) {
        char *expected = sqlite_expected;
        int known = expected != NULL && strcmp(expected, name) == 0;
        sqlite_expected = NULL;  /* only the thread's next database open can be the connection's own */
        free(expected);
        if (!known) {
            PyGILState_STATE g;
            PyObject *path, *type, *value, *tb, *why;
            int rc;
            if (IS_FINALIZING())  /* no Python left to record it (and taking the GIL could end this thread) */
                return SQLITE_CANTOPEN;
            g = PyGILState_Ensure();
            path = PyUnicode_DecodeFSDefault(name);
            rc = path == NULL ? -1 : PySys_Audit("ngp.sqlite3.open", "Oi", path, flags);
            Py_XDECREF(path);
            if (rc < 0) {  /* SQLite reports only that the open failed: say why on stderr */
                PyErr_Fetch(&type, &value, &tb);
                why = value != NULL ? PyObject_Str(value) : NULL;
                if (why != NULL && PyUnicode_Check(why))
                    PySys_WriteStderr("SQLite may not open %.500s: %.500s\n", name, PyUnicode_AsUTF8(why));
                Py_XDECREF(why);
                Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
                PyErr_Clear();  /* from PyObject_Str, if it failed */
            }
            PyGILState_Release(g);
            if (rc < 0)
                return SQLITE_CANTOPEN;
        }
    }
    return o->xOpen(o, name, f, flags, out);
}

static int vfs_delete(sqlite3_vfs *v, const char *n, int sync) { return ORIG(v)->xDelete(ORIG(v), n, sync); }
static int vfs_access(sqlite3_vfs *v, const char *n, int fl, int *r) { return ORIG(v)->xAccess(ORIG(v), n, fl, r); }
static int vfs_full(sqlite3_vfs *v, const char *n, int k, char *o) { return ORIG(v)->xFullPathname(ORIG(v), n, k, o); }
static void *vfs_dlopen(sqlite3_vfs *v, const char *n) { return ORIG(v)->xDlOpen(ORIG(v), n); }
static void vfs_dlerror(sqlite3_vfs *v, int k, char *m) { ORIG(v)->xDlError(ORIG(v), k, m); }
static void (*vfs_dlsym(sqlite3_vfs *v, void *h, const char *s))(void) { return ORIG(v)->xDlSym(ORIG(v), h, s); }
static void vfs_dlclose(sqlite3_vfs *v, void *h) { ORIG(v)->xDlClose(ORIG(v), h); }
static int vfs_random(sqlite3_vfs *v, int k, char *o) { return ORIG(v)->xRandomness(ORIG(v), k, o); }
static int vfs_sleep(sqlite3_vfs *v, int us) { return ORIG(v)->xSleep(ORIG(v), us); }
static int vfs_time(sqlite3_vfs *v, double *t) { return ORIG(v)->xCurrentTime(ORIG(v), t); }
static int vfs_lasterr(sqlite3_vfs *v, int k, char *m) { return ORIG(v)->xGetLastError(ORIG(v), k, m); }
static int vfs_time64(sqlite3_vfs *v, sqlite3_int64 *t) { return ORIG(v)->xCurrentTimeInt64(ORIG(v), t); }
static int vfs_setsys(sqlite3_vfs *v, const char *n, sqlite3_syscall_ptr p) { return ORIG(v)->xSetSystemCall(ORIG(v), n, p); }
static sqlite3_syscall_ptr vfs_getsys(sqlite3_vfs *v, const char *n) { return ORIG(v)->xGetSystemCall(ORIG(v), n); }
static const char *vfs_nextsys(sqlite3_vfs *v, const char *n) { return ORIG(v)->xNextSystemCall(ORIG(v), n); }

static int sqlite_watched = 0;  /* 1 wrapped, -1 cannot be (no shared libsqlite3) */

static PyObject *
watch_sqlite(PyObject *self, PyObject *unused)
{
    void *lib;
    sqlite3_vfs *(*find)(const char *);
    int (*reg)(sqlite3_vfs *, int);
    sqlite3_vfs *orig[32], *dflt;
    int n = 0;
    (void)self; (void)unused;
    if (sqlite_watched)
        return PyBool_FromLong(sqlite_watched > 0);
    sqlite_watched = -1;
    lib = dlopen("libsqlite3.so.0", RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL)
        Py_RETURN_FALSE;
    find = (sqlite3_vfs *(*)(const char *))dlsym(lib, "sqlite3_vfs_find");
    reg = (int (*)(sqlite3_vfs *, int))dlsym(lib, "sqlite3_vfs_register");
    if (find == NULL || reg == NULL || (dflt = find(NULL)) == NULL)
        Py_RETURN_FALSE;
    for (sqlite3_vfs *v = dflt; v != NULL && n < 32; v = v->pNext)
        orig[n++] = v;
    for (int i = 0; i < n; i++) {  /* the default first: the others go in just after it, before their originals */
        sqlite3_vfs *o = orig[i];
        ngp_vfs_t *w = calloc(1, sizeof *w);  /* held for the life of the process */
        if (w == NULL)
            return PyErr_NoMemory();
        w->base = *o;
        w->base.pNext = NULL;
        w->orig = o;
        w->base.xOpen = vfs_open;
        w->base.xDelete = o->xDelete ? vfs_delete : NULL;
        w->base.xAccess = o->xAccess ? vfs_access : NULL;
        w->base.xFullPathname = o->xFullPathname ? vfs_full : NULL;
        w->base.xDlOpen = o->xDlOpen ? vfs_dlopen : NULL;
        w->base.xDlError = o->xDlError ? vfs_dlerror : NULL;
        w->base.xDlSym = o->xDlSym ? vfs_dlsym : NULL;
        w->base.xDlClose = o->xDlClose ? vfs_dlclose : NULL;
        w->base.xRandomness = o->xRandomness ? vfs_random : NULL;
        w->base.xSleep = o->xSleep ? vfs_sleep : NULL;
        w->base.xCurrentTime = o->xCurrentTime ? vfs_time : NULL;
        w->base.xGetLastError = o->xGetLastError ? vfs_lasterr : NULL;
        if (o->iVersion >= 2)
            w->base.xCurrentTimeInt64 = o->xCurrentTimeInt64 ? vfs_time64 : NULL;
        if (o->iVersion >= 3) {
            w->base.xSetSystemCall = o->xSetSystemCall ? vfs_setsys : NULL;
            w->base.xGetSystemCall = o->xGetSystemCall ? vfs_getsys : NULL;
            w->base.xNextSystemCall = o->xNextSystemCall ? vfs_nextsys : NULL;
        }
        if (reg(&w->base, o == dflt) != SQLITE_OK)
            Py_RETURN_FALSE;
    }
    sqlite_watched = 1;
    Py_RETURN_TRUE;
}

static PyObject *
sqlite_expect(PyObject *self, PyObject *arg)
{
    PyObject *b;
    (void)self;
    free(sqlite_expected);
    sqlite_expected = NULL;
    if (arg == Py_None)
        Py_RETURN_NONE;
    if (!PyUnicode_FSConverter(arg, &b))
        return NULL;
    sqlite_expected = strdup(PyBytes_AS_STRING(b));
    Py_DECREF(b);
    if (sqlite_expected == NULL)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}
#else
static PyObject *
watch_sqlite(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    Py_RETURN_FALSE;
}

static PyObject *
sqlite_expect(PyObject *self, PyObject *arg)
{
    (void)self; (void)arg;
    Py_RETURN_NONE;
}
#endif

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS, "Add the C audit hook (once per process)."},
    {"write_through", set_write_through, METH_VARARGS,
     "write_through(on=True): from now on, hand every recorded event to the handler (or, with False where the "
     "sender thread runs, queue plain opens again)."},
    {"encode", encode, METH_VARARGS, "The POST body of buffered items: encode(items, dump, escape, record_text)."},
    {"start_sender", start_sender, METH_VARARGS,
     "start_sender(host, port (or a unix socket path and \"\"), request_head, linger, batch, max_post, capacity, timeout, dump, escape): "
     "deliver from the C queue (once, before install)."},
    {"put", queue_put, METH_O, "put(record): queue one record (a dict), encoded with json.dumps."},
    {"wait", queue_wait, METH_O, "wait(timeout) -> None | reason: until everything queued now is acknowledged."},
    {"sender_status", queue_status, METH_NOARGS, "The queue and the sender: pending, posts, failures, last_error."},
    {"stats", stats, METH_NOARGS, "Whether the hook is installed; opens taken by the fast path; events handed on."},
    {"watch_sqlite", watch_sqlite, METH_NOARGS,
     "Raise ngp.sqlite3.open for every database file SQLite opens (ATTACH, VACUUM INTO); True if it can."},
    {"sqlite_expect", sqlite_expect, METH_O,
     "sqlite_expect(path or None): the calling thread's next database open is this one, already recorded."},
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
