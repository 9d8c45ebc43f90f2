/* C versions of a few functions of the per-request path, for CPython (cluster/speedups.py).

Each does exactly what the Python function it stands for does (that function is the fallback when
this module is not built, and the tests compare the two); where an input is not the common case,
the function says so (returns None) and the Python code handles it, so that every rule and every
error message stays in one place, in Python.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define WHOLE_TEXT 0x81   /* FIN | text */
#define MASKED 0x80

/* The Python versions, for what is not the common case (set_python). */
enum { PY_TEXT_FRAME, PY_ENCODE_WS_FRAME, PY_OBSERVE, PY_REQUEST_FRAME, PY_COUNT };
static const char *python_names[PY_COUNT] = {"text_frame", "encode_ws_frame", "observe", "request_frame"};
static PyObject *python_versions[PY_COUNT];

/* Holds `value` in a module slot, letting go of what the slot held (the setup functions). */
static void
keep(PyObject **slot, PyObject *value)
{
    Py_INCREF(value);
    Py_XSETREF(*slot, value);
}

/* set_python(name, function): the Python version of the C function `name`. */
static PyObject *
set_python(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_python(name, function)");
        return NULL;
    }
    for (int i = 0; i < PY_COUNT; i++) {
        if (PyUnicode_CompareWithASCIIString(args[0], python_names[i]) == 0) {
            keep(&python_versions[i], args[1]);
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "set_python: no C function %R", args[0]);
    return NULL;
}

/* Calls the Python version `which` with the same arguments. */
static PyObject *
in_python(int which, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (python_versions[which] == NULL) {
        PyErr_Format(PyExc_RuntimeError, "cluster._speedups: set_python(%s) was not called", python_names[which]);
        return NULL;
    }
    return PyObject_Vectorcall(python_versions[which], args, nargs, kwnames);
}

/* Unmasks `length` bytes of `src` with the 4-byte `mask` into `dst` (RFC 6455, 5.3). */
static void
unmask(char *dst, const unsigned char *src, Py_ssize_t length, const unsigned char *mask)
{
    Py_ssize_t i = 0;
    uint32_t word_mask;
    memcpy(&word_mask, mask, 4);
    for (; i + 4 <= length; i += 4) {
        uint32_t word;
        memcpy(&word, src + i, 4);
        word ^= word_mask;
        memcpy(dst + i, &word, 4);
    }
    for (; i < length; i++) {
        dst[i] = (char)(src[i] ^ mask[i & 3]);
    }
}

/* text_frame(data, pos, max_size) -> None | (end, str) | (end, None)

   node/client_protocol.py, ClientProtocol._whole_text: the frame at data[pos:] when it is a whole
   masked text frame (FIN set, no extension bits) of fewer than 65,536 bytes and at most max_size
   bytes: (the offset after it, its payload decoded as UTF-8), or (the offset after it, None) when
   the payload is not UTF-8. None for anything else (not whole yet, another frame, too large). */
static PyObject *
text_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t pos, max_size, size, length, start, end;
    const unsigned char *bytes;
    unsigned char second;
    PyObject *text, *result;
    char small[512];
    char *payload;

    if (nargs != 3 || !PyByteArray_CheckExact(args[0]) || !PyLong_CheckExact(args[1])
            || !PyLong_CheckExact(args[2])) {
        return in_python(PY_TEXT_FRAME, args, nargs, NULL);
    }
    pos = PyLong_AsSsize_t(args[1]);
    max_size = PyLong_AsSsize_t(args[2]);
    if ((pos == -1 || max_size == -1) && PyErr_Occurred()) {
        PyErr_Clear();
        return in_python(PY_TEXT_FRAME, args, nargs, NULL);
    }
    if (pos < 0 || pos > PyByteArray_GET_SIZE(args[0])) {   /* Python's indexing rules: its own */
        return in_python(PY_TEXT_FRAME, args, nargs, NULL);
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    bytes = (const unsigned char *)view.buf;
    size = view.len - pos;
    if (size < 6 || bytes[pos] != WHOLE_TEXT) {
        goto not_ours;
    }
    second = bytes[pos + 1];
    if (second >= MASKED && second < (MASKED | 126)) {
        length = second & 0x7F;
        start = pos + 2;
    }
    else if (second == (MASKED | 126) && size >= 8) {
        length = ((Py_ssize_t)bytes[pos + 2] << 8) | bytes[pos + 3];
        start = pos + 4;
    }
    else {
        goto not_ours;
    }
    end = start + 4 + length;
    if (end - pos > size || length > max_size) {
        goto not_ours;
    }
    if (length <= (Py_ssize_t)sizeof(small)) {
        payload = small;
    }
    else {
        payload = PyMem_Malloc(length);
        if (payload == NULL) {
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
    }
    unmask(payload, bytes + start + 4, length, bytes + start);
    PyBuffer_Release(&view);
    text = PyUnicode_DecodeUTF8(payload, length, "strict");
    if (payload != small) {
        PyMem_Free(payload);
    }
    if (text == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            return NULL;
        }
        PyErr_Clear();
        Py_INCREF(Py_None);
        text = Py_None;
    }
    result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(text);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, PyLong_FromSsize_t(end));
    PyTuple_SET_ITEM(result, 1, text);
    if (PyTuple_GET_ITEM(result, 0) == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    return result;

not_ours:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* encode_ws_frame(data, binary=False) -> bytes

   cluster/protocol.py, encode_ws_frame: one unmasked, unfragmented server-to-client frame. */
static PyObject *
encode_ws_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_buffer view;
    int binary = 0;
    Py_ssize_t length, header, keywords = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *frame, *flag = nargs == 2 ? args[1] : NULL;
    unsigned char *out;

    if (nargs < 1 || nargs + keywords > 2 || !PyBytes_CheckExact(args[0]) || (keywords && PyUnicode_CompareWithASCIIString(
            PyTuple_GET_ITEM(kwnames, 0), "binary") != 0)) {
        return in_python(PY_ENCODE_WS_FRAME, args, nargs, kwnames);
    }
    if (keywords) {
        flag = args[1];
    }
    if (flag != NULL) {
        binary = PyObject_IsTrue(flag);
        if (binary < 0) {
            return NULL;
        }
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    length = view.len;
    header = length < 126 ? 2 : (length <= 0xFFFF ? 4 : 10);
    frame = PyBytes_FromStringAndSize(NULL, header + length);
    if (frame == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    out = (unsigned char *)PyBytes_AS_STRING(frame);
    out[0] = binary ? 0x82 : 0x81;
    if (header == 2) {
        out[1] = (unsigned char)length;
    }
    else if (header == 4) {
        out[1] = 126;
        out[2] = (unsigned char)(length >> 8);
        out[3] = (unsigned char)length;
    }
    else {
        uint64_t big = (uint64_t)length;
        out[1] = 127;
        for (int i = 0; i < 8; i++) {
            out[2 + i] = (unsigned char)(big >> (56 - 8 * i));
        }
    }
    memcpy(out + header, view.buf, length);
    PyBuffer_Release(&view);
    return frame;
}


/* --- the /ws/v1 request and mesh.send's parameters (cluster/protocol.py) ------------------------ */

/* What setup() hands over: msgspec's decode, the method names, the result types, the Python
   functions that handle whatever is not the common case. */
static PyObject *strict_decode, *method_names, *ws_request_type, *send_params_type, *payload_type;
static PyObject *ws_request_python, *send_python;
static PyObject *str_i, *str_id, *str_m, *str_p, *str_c, *str_d, *str_t, *str_text;

#define UJSON_DEPTH 1024

static PyObject *
setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject **slots[] = {&strict_decode, &method_names, &ws_request_type, &send_params_type, &payload_type,
                          &ws_request_python, &send_python};
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "setup(decode, method_names, WsRequest, SendParams, Payload, "
                                         "parse_ws_request, parse_send)");
        return NULL;
    }
    for (int i = 2; i < 5; i++) {
        if (!PyType_Check(args[i]) || !PyType_IsSubtype((PyTypeObject *)args[i], &PyTuple_Type)) {
            PyErr_SetString(PyExc_TypeError, "setup: the result types must be tuple subclasses");
            return NULL;
        }
    }
    if (!PyFrozenSet_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "setup: method_names must be a frozenset");
        return NULL;
    }
    for (int i = 0; i < 7; i++) {
        keep(slots[i], args[i]);
    }
    Py_RETURN_NONE;
}

/* A tuple of a NamedTuple class, as tuple.__new__(cls, (a, b)) makes it; steals the references. */
static PyObject *
pair_of(PyObject *type, PyObject *first, PyObject *second)
{
    PyObject *pair = ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, 2);
    if (pair == NULL) {
        Py_DECREF(first);
        Py_DECREF(second);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, first);
    PyTuple_SET_ITEM(pair, 1, second);
    return pair;
}

/* Whether `text` holds `\ud` or `\uD`: what cluster/protocol.py's _surrogate_free looks for first. */
static int
may_hold_surrogate(PyObject *text)
{
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    for (Py_ssize_t i = 0; i + 2 < length; i++) {
        if (PyUnicode_READ(kind, data, i) == '\\' && PyUnicode_READ(kind, data, i + 1) == 'u') {
            Py_UCS4 third = PyUnicode_READ(kind, data, i + 2);
            if (third == 'd' || third == 'D') {
                return 1;
            }
        }
    }
    return 0;
}

/* At least how deep `text` could nest: its opening brackets (cluster/protocol.py, _nesting_bound). */
static Py_ssize_t
nesting_bound(PyObject *text)
{
    Py_ssize_t length = PyUnicode_GET_LENGTH(text), count = 0;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    for (Py_ssize_t i = 0; i < length; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        count += (c == '[' || c == '{');
    }
    return count;
}

static PyObject *
call_python(PyObject *function, PyObject *const *args, Py_ssize_t nargs)
{
    if (function == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cluster._speedups: setup() was not called");
        return NULL;
    }
    return PyObject_Vectorcall(function, args, nargs, NULL);
}

/* parse_ws_request(text) -> WsRequest

   cluster/protocol.py, parse_ws_request, for a text that strict JSON reads into an object with a
   known method `m`, an integer, string or absent id and no `\ud` escape anywhere; anything else
   goes to the Python function, which reads it again and says what is wrong. */
static PyObject *
parse_ws_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *text, *message, *req_id, *method, *params, *result;

    if (nargs != 1 || strict_decode == NULL || !PyUnicode_CheckExact(args[0])) {
        return call_python(ws_request_python, args, nargs);
    }
    text = args[0];
    if (PyUnicode_GET_LENGTH(text) > UJSON_DEPTH && nesting_bound(text) > UJSON_DEPTH) {
        return call_python(ws_request_python, args, nargs);
    }
    if (may_hold_surrogate(text)) {
        return call_python(ws_request_python, args, nargs);
    }
    message = PyObject_CallOneArg(strict_decode, text);
    if (message == NULL) {
        PyErr_Clear();   /* what strict JSON refuses: ujson's to read or refuse, in the Python function */
        return call_python(ws_request_python, args, nargs);
    }
    if (!PyDict_CheckExact(message)) {
        goto python;
    }
    req_id = PyDict_GetItemWithError(message, str_i);
    if (req_id == NULL) {
        if (PyErr_Occurred()) {
            goto python;
        }
        req_id = PyDict_GetItemWithError(message, str_id);
        if (req_id == NULL) {
            if (PyErr_Occurred()) {
                goto python;
            }
            req_id = Py_None;
        }
    }
    if (req_id != Py_None && !PyLong_CheckExact(req_id) && !PyUnicode_CheckExact(req_id)) {
        goto python;
    }
    method = PyDict_GetItemWithError(message, str_m);
    if (method == NULL || !PyUnicode_CheckExact(method)) {
        goto python;
    }
    switch (PySet_Contains(method_names, method)) {
    case 1:
        break;
    case 0:
        goto python;
    default:
        PyErr_Clear();
        goto python;
    }
    params = PyDict_GetItemWithError(message, str_p);
    if (params == NULL) {
        if (PyErr_Occurred()) {
            goto python;
        }
        params = PyDict_New();
        if (params == NULL) {
            Py_DECREF(message);
            return NULL;
        }
    }
    else {
        Py_INCREF(params);
    }
    result = ((PyTypeObject *)ws_request_type)->tp_alloc((PyTypeObject *)ws_request_type, 3);
    if (result == NULL) {
        Py_DECREF(params);
        Py_DECREF(message);
        return NULL;
    }
    Py_INCREF(method);
    Py_INCREF(req_id);
    PyTuple_SET_ITEM(result, 0, method);
    PyTuple_SET_ITEM(result, 1, params);
    PyTuple_SET_ITEM(result, 2, req_id);
    Py_DECREF(message);
    return result;

python:
    PyErr_Clear();
    Py_DECREF(message);
    return call_python(ws_request_python, args, nargs);
}

/* Whether each character of text[0:length] is within low..high. */
static int
all_within(const Py_UCS1 *text, Py_ssize_t length, Py_UCS1 low, Py_UCS1 high)
{
    for (Py_ssize_t i = 0; i < length; i++) {
        if (text[i] < low || text[i] > high) {
            return 0;
        }
    }
    return 1;
}

/* The `c` of params, an ASCII string, and the UTF-8 of its text `d` (`t` absent or "text"), as parse_send
   and parse_publish take them: 1 with *c (borrowed) and *encoded (new) set; 0 for anything else, with no
   error set (the Python function reads it). */
static int
ascii_c_and_text(PyObject *params, PyObject **c, PyObject **encoded)
{
    PyObject *data, *type;

    *c = PyDict_GetItemWithError(params, str_c);
    data = *c == NULL ? NULL : PyDict_GetItemWithError(params, str_d);
    if (data == NULL || !PyUnicode_CheckExact(*c) || !PyUnicode_CheckExact(data) || !PyUnicode_IS_ASCII(*c)) {
        PyErr_Clear();
        return 0;
    }
    type = PyDict_GetItemWithError(params, str_t);
    if (type == NULL ? PyErr_Occurred() != NULL : !(PyUnicode_CheckExact(type) && PyUnicode_Compare(type, str_text) == 0)) {
        PyErr_Clear();
        return 0;
    }
    *encoded = PyUnicode_AsUTF8String(data);
    if (*encoded == NULL) {   /* a lone surrogate: the Python function names it */
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* parse_send(params, prefix="p.") -> SendParams

   cluster/protocol.py, parse_send, for an object whose `c` is a string of 1 to 19 ASCII digits and
   whose `d` is a string of text (`t` absent or "text"); anything else goes to the Python function. */
static PyObject *
parse_send(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *client, *client_id, *encoded, *payload;
    Py_ssize_t length;
    const Py_UCS1 *digits;

    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) {   /* prefix=...: only names the fields in errors */
        if (send_python == NULL) {
            return call_python(NULL, args, nargs);
        }
        return PyObject_Vectorcall(send_python, args, nargs, kwnames);
    }
    if (nargs < 1 || nargs > 2 || payload_type == NULL || !PyDict_CheckExact(args[0])
            || !ascii_c_and_text(args[0], &client, &encoded)) {
        return call_python(send_python, args, nargs);
    }
    length = PyUnicode_GET_LENGTH(client);
    digits = PyUnicode_1BYTE_DATA(client);
    if (length < 1 || length >= 20 || !all_within(digits, length, '0', '9')) {
        Py_DECREF(encoded);
        return call_python(send_python, args, nargs);
    }
    client_id = PyLong_FromString((const char *)digits, NULL, 10);
    if (client_id == NULL) {
        Py_DECREF(encoded);
        return NULL;
    }
    Py_INCREF(Py_False);
    payload = pair_of(payload_type, encoded, Py_False);
    if (payload == NULL) {
        Py_DECREF(client_id);
        return NULL;
    }
    return pair_of(send_params_type, client_id, payload);
}

/* --- durations (node/metrics.py) and mesh frames (cluster/mesh.py) -------------------------------- */

static double *bucket_bounds;
static Py_ssize_t bucket_count;

/* set_buckets(bounds): the upper bounds, in order, of every duration histogram. */
static PyObject *
set_buckets(PyObject *module, PyObject *bounds)
{
    PyObject *items = PySequence_Tuple(bounds);
    double *copy;
    Py_ssize_t count;
    if (items == NULL) {
        return NULL;
    }
    count = PyTuple_GET_SIZE(items);
    copy = PyMem_Malloc(sizeof(double) * (count ? count : 1));
    if (copy == NULL) {
        Py_DECREF(items);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        copy[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(items, i));
        if (copy[i] == -1.0 && PyErr_Occurred()) {
            PyMem_Free(copy);
            Py_DECREF(items);
            return NULL;
        }
        if (i && !(copy[i - 1] < copy[i])) {
            PyMem_Free(copy);
            Py_DECREF(items);
            PyErr_SetString(PyExc_ValueError, "set_buckets: the bounds must increase");
            return NULL;
        }
    }
    Py_DECREF(items);
    PyMem_Free(bucket_bounds);
    bucket_bounds = copy;
    bucket_count = count;
    Py_RETURN_NONE;
}

/* Adds `amount` to the float at series[index]. */
static int
add_to(PyObject *series, Py_ssize_t index, double amount)
{
    double value = PyFloat_AsDouble(PyList_GET_ITEM(series, index));
    PyObject *sum;
    if (value == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    sum = PyFloat_FromDouble(value + amount);
    if (sum == NULL) {
        return -1;
    }
    return PyList_SetItem(series, index, sum);   /* takes `sum`, lets go of the old value */
}

/* observe(series, labels, seconds)

   node/metrics.py, observe: one duration into the bucket list of `labels` in `series` (made when
   it is the first): its sum first, then the count of the first bucket whose bound is not below it. */
static PyObject *
observe(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *series, *list;
    double seconds;
    Py_ssize_t bucket = 0;

    if (nargs != 3 || !PyDict_CheckExact(args[0]) || !PyFloat_CheckExact(args[2]) || bucket_bounds == NULL) {
        return in_python(PY_OBSERVE, args, nargs, NULL);   /* an int, a bool, anything else: Python's rules */
    }
    seconds = PyFloat_AS_DOUBLE(args[2]);
    series = args[0];
    list = PyDict_GetItemWithError(series, args[1]);
    if (list == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        list = PyList_New(bucket_count + 2);
        if (list == NULL) {
            return NULL;
        }
        for (Py_ssize_t i = 0; i < bucket_count + 2; i++) {
            PyObject *zero = PyFloat_FromDouble(0.0);
            if (zero == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            PyList_SET_ITEM(list, i, zero);
        }
        if (PyDict_SetItem(series, args[1], list) < 0) {
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(list);   /* the dict holds it */
    }
    if (!PyList_CheckExact(list) || PyList_GET_SIZE(list) != bucket_count + 2) {
        PyErr_SetString(PyExc_TypeError, "observe: a series is a list of one sum and a count per bucket");
        return NULL;
    }
    while (bucket < bucket_count && bucket_bounds[bucket] < seconds) {
        bucket++;
    }
    if (add_to(list, 0, seconds) < 0 || add_to(list, 1 + bucket, 1.0) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* request_frame(code, request_id, head, body) -> bytes

   cluster/mesh.py, request_frame: code (1 byte), request id (8), head length (4), all big-endian,
   then the head and the body. */
static PyObject *
request_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long code;
    unsigned long long request_id;
    PyObject *frame;
    char *out;
    Py_ssize_t head_size, body_size;

    if (nargs != 4 || !PyLong_CheckExact(args[0]) || !PyLong_CheckExact(args[1]) || !PyBytes_CheckExact(args[2])
            || !PyBytes_CheckExact(args[3])) {
        return in_python(PY_REQUEST_FRAME, args, nargs, NULL);
    }
    code = PyLong_AsUnsignedLong(args[0]);
    request_id = PyLong_AsUnsignedLongLong(args[1]);
    head_size = PyBytes_GET_SIZE(args[2]);
    body_size = PyBytes_GET_SIZE(args[3]);
    if (PyErr_Occurred() || code > 0xFF || (unsigned long long)head_size > 0xFFFFFFFFULL) {
        PyErr_Clear();   /* out of range: the Python version's error */
        return in_python(PY_REQUEST_FRAME, args, nargs, NULL);
    }
    frame = PyBytes_FromStringAndSize(NULL, 13 + head_size + body_size);
    if (frame == NULL) {
        return NULL;
    }
    out = PyBytes_AS_STRING(frame);
    out[0] = (char)code;
    for (int i = 0; i < 8; i++) {
        out[1 + i] = (char)(request_id >> (56 - 8 * i));
    }
    for (int i = 0; i < 4; i++) {
        out[9 + i] = (char)((unsigned long long)head_size >> (24 - 8 * i));
    }
    memcpy(out + 13, PyBytes_AS_STRING(args[2]), head_size);
    memcpy(out + 13 + head_size, PyBytes_AS_STRING(args[3]), body_size);
    return frame;
}

/* batched_replies(frame: bytes) -> list | None

   cluster/mesh.py, batched_replies_python: a batch (code 7, then length | message for each) of
   whole replies (code 6, request id, result): [(request_id, result), ...]; None for any other. */
#define BATCH_MAX 1024
#define REPLY_CODE 6

static PyObject *
batched_replies(PyObject *module, PyObject *frame)
{
    const unsigned char *bytes;
    Py_ssize_t at = 1, end;
    PyObject *replies;

    if (!PyBytes_CheckExact(frame)) {
        PyErr_SetString(PyExc_TypeError, "batched_replies(frame: bytes)");
        return NULL;
    }
    bytes = (const unsigned char *)PyBytes_AS_STRING(frame);
    end = PyBytes_GET_SIZE(frame);
    replies = PyList_New(0);
    if (replies == NULL) {
        return NULL;
    }
    while (at < end) {
        uint32_t size;
        unsigned long long request_id = 0;
        PyObject *id, *result, *pair;
        if (at + 13 > end) {
            goto not_ours;
        }
        size = ((uint32_t)bytes[at] << 24) | ((uint32_t)bytes[at + 1] << 16) | ((uint32_t)bytes[at + 2] << 8)
               | bytes[at + 3];
        if (bytes[at + 4] != REPLY_CODE || size < 9 || (Py_ssize_t)size > end - at - 4) {
            goto not_ours;
        }
        for (int i = 0; i < 8; i++) {
            request_id = (request_id << 8) | bytes[at + 5 + i];
        }
        at += 4;
        id = PyLong_FromUnsignedLongLong(request_id);
        result = PyBytes_FromStringAndSize((const char *)bytes + at + 9, size - 9);
        if (id == NULL || result == NULL) {
            Py_XDECREF(id);
            Py_XDECREF(result);
            Py_DECREF(replies);
            return NULL;
        }
        pair = PyTuple_New(2);
        if (pair == NULL) {
            Py_DECREF(id);
            Py_DECREF(result);
            Py_DECREF(replies);
            return NULL;
        }
        PyTuple_SET_ITEM(pair, 0, id);
        PyTuple_SET_ITEM(pair, 1, result);
        if (PyList_Append(replies, pair) < 0) {
            Py_DECREF(pair);
            Py_DECREF(replies);
            return NULL;
        }
        Py_DECREF(pair);
        at += size;
        if (PyList_GET_SIZE(replies) > BATCH_MAX) {
            goto not_ours;
        }
    }
    if (PyList_GET_SIZE(replies) == 0) {
        goto not_ours;
    }
    return replies;

not_ours:
    Py_DECREF(replies);
    Py_RETURN_NONE;
}

/* --- a peer's mesh.send (cluster/mesh.py, read_request) ---------------------------------------------------- */

static PyObject *request_type, *send_type, *publish_type;

/* setup_mesh(Request, Send, Publish): the result types of read_common_request. */
static PyObject *
setup_mesh(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "setup_mesh(Request, Send, Publish)");
        return NULL;
    }
    for (int i = 0; i < 3; i++) {
        if (!PyType_Check(args[i]) || !PyType_IsSubtype((PyTypeObject *)args[i], &PyTuple_Type)) {
            PyErr_SetString(PyExc_TypeError, "setup_mesh: the result types must be tuple subclasses");
            return NULL;
        }
    }
    keep(&request_type, args[0]);
    keep(&send_type, args[1]);
    keep(&publish_type, args[2]);
    Py_RETURN_NONE;
}

/* Whether `data` is UTF-8 as Python's strict decoder reads it. */
static int
is_utf8(const unsigned char *data, Py_ssize_t size)
{
    PyObject *text;
    Py_ssize_t i = 0;
    while (i < size && data[i] < 0x80) {
        i++;
    }
    if (i == size) {
        return 1;
    }
    text = PyUnicode_DecodeUTF8((const char *)data + i, size - i, "strict");
    if (text == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(text);
    return 1;
}

/* The client id of the head {"c":N} as send_request writes it (N as JSON writes it, below 2^64), or -1. */
static int
send_client(const unsigned char *head, Py_ssize_t size, unsigned long long *client_id)
{
    Py_ssize_t digits = size - 6;   /* {"c": and } */
    if (digits < 1 || digits > 20 || memcmp(head, "{\"c\":", 5) != 0 || head[size - 1] != '}'
            || (digits > 1 && head[5] == '0')) {
        return -1;
    }
    *client_id = 0;
    for (Py_ssize_t i = 0; i < digits; i++) {
        unsigned char c = head[5 + i];
        if (c < '0' || c > '9' || *client_id > (18446744073709551615ULL - (c - '0')) / 10) {
            return -1;   /* not digits, or beyond 2^64 - 1 */
        }
        *client_id = *client_id * 10 + (c - '0');
    }
    return 0;
}

/* The channels of the head {"ch":["a","b"]} as publish_request writes them, each name of 1 to 255
   printable ASCII characters other than space, quote and backslash (what JSON writes as it is and
   cluster/protocol.py's name_problem accepts): a new list; NULL, with no error set, for any other head. */
static PyObject *
publish_channels(const unsigned char *head, Py_ssize_t size)
{
    PyObject *channels, *name;
    Py_ssize_t pos = 7, end = size - 2;   /* past {"ch":[ and before ]} */

    if (size < 12 || memcmp(head, "{\"ch\":[", 7) != 0 || head[size - 2] != ']' || head[size - 1] != '}') {
        return NULL;
    }
    channels = PyList_New(0);
    if (channels == NULL) {
        return NULL;
    }
    while (pos < end) {
        Py_ssize_t first = pos + 1, last = first;
        if (head[pos] != '"') {
            goto other;
        }
        while (last < end && head[last] != '"') {
            if (head[last] <= ' ' || head[last] >= 0x7f || head[last] == '\\') {
                goto other;
            }
            last++;
        }
        if (last == end || last == first || last - first > 255) {
            goto other;
        }
        name = PyUnicode_DecodeASCII((const char *)head + first, last - first, NULL);
        if (name == NULL || PyList_Append(channels, name) < 0) {
            Py_XDECREF(name);
            Py_DECREF(channels);
            return NULL;
        }
        Py_DECREF(name);
        pos = last + 1;
        if (pos < end && (head[pos] != ',' || pos + 1 == end)) {
            goto other;
        }
        if (pos < end) {
            pos++;   /* past the comma */
        }
    }
    return channels;   /* at least one: the head is longer than {"ch":[]} */

other:
    Py_DECREF(channels);
    return NULL;
}

/* read_common_request(frame) -> Request | None

   cluster/mesh.py, read_request, for the requests a peer's send_request or publish_request and
   request_frame make: kind SEND (1) with the head exactly {"c":N}, or kind PUB (2) with the head
   exactly {"ch":[...]} (see publish_channels), the body one unmasked final data frame of exact length
   and at most 64 KiB (text in UTF-8). None for any other frame: read_request reads it, and says what
   is wrong with it. */
static PyObject *
read_common_request(PyObject *module, PyObject *frame)
{
    Py_buffer view;
    const unsigned char *bytes, *frame_at;
    Py_ssize_t size, head_size, end, body_size, start, length;
    unsigned long long request_id = 0, client_id = 0;
    PyObject *id = NULL, *target = NULL, *body = NULL, *message;

    if (request_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cluster._speedups: setup_mesh() was not called");
        return NULL;
    }
    if (PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();   /* not bytes: read_request says what it is */
        Py_RETURN_NONE;
    }
    bytes = (const unsigned char *)view.buf;
    size = view.len;
    if (size < 13 || (bytes[0] != 1 && bytes[0] != 2)) {
        goto not_ours;
    }
    for (int i = 0; i < 8; i++) {
        request_id = (request_id << 8) | bytes[1 + i];
    }
    head_size = ((Py_ssize_t)bytes[9] << 24) | ((Py_ssize_t)bytes[10] << 16) | ((Py_ssize_t)bytes[11] << 8) | bytes[12];
    end = 13 + head_size;
    if (end > size || (bytes[0] == 1 && send_client(bytes + 13, head_size, &client_id) < 0)) {
        goto not_ours;
    }
    body_size = size - end;
    frame_at = bytes + end;
    if (body_size < 2 || (frame_at[0] != 0x81 && frame_at[0] != 0x82) || frame_at[1] & 0x80) {
        goto not_ours;
    }
    length = frame_at[1];
    start = 2;
    if (length == 126) {
        if (body_size < 4) {
            goto not_ours;
        }
        length = ((Py_ssize_t)frame_at[2] << 8) | frame_at[3];
        start = 4;
        if (length < 126) {
            goto not_ours;
        }
    }
    else if (length == 127) {
        goto not_ours;   /* over 64 KiB: the Python reader */
    }
    if (start + length != body_size || (frame_at[0] == 0x81 && !is_utf8(frame_at + start, length))) {
        goto not_ours;
    }
    if (bytes[0] == 2) {
        target = publish_channels(bytes + 13, head_size);
        if (target == NULL) {
            if (PyErr_Occurred()) {
                PyBuffer_Release(&view);
                return NULL;
            }
            goto not_ours;
        }
    }
    else {
        target = PyLong_FromUnsignedLongLong(client_id);
    }
    id = PyLong_FromUnsignedLongLong(request_id);
    body = PyBytes_FromStringAndSize((const char *)frame_at, body_size);
    PyBuffer_Release(&view);
    if (id == NULL || target == NULL || body == NULL) {
        goto failed;
    }
    message = pair_of(bytes[0] == 1 ? send_type : publish_type, target, body);
    if (message == NULL) {
        Py_DECREF(id);
        return NULL;
    }
    return pair_of(request_type, id, message);

failed:
    Py_XDECREF(id);
    Py_XDECREF(target);
    Py_XDECREF(body);
    return NULL;

not_ours:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* --- corked frames out (node/clients.py, send_corked) ------------------------------------------------------ */

static PyObject *plain_socket_type;
static PyObject *str_stream, *str_write_buffer, *str_size, *str_socket;

static PyObject *frames_type;     /* node/clients.py's _Frames */
static Py_ssize_t cork_bytes;      /* node/clients.py's CORK_BYTES */
static PyObject *str_frames_size;

/* setup_clients(socket.socket, _Frames, CORK_BYTES): the one socket type whose bytes go straight to
   its descriptor (a subclass, such as ssl.SSLSocket, is written through its own send); the type of a
   connection's corked frames, and how many bytes may wait corked. */
static PyObject *
setup_clients(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t bound;
    if (nargs != 3 || !PyType_Check(args[0]) || !PyType_Check(args[1]) || !PyLong_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "setup_clients(socket.socket, _Frames, CORK_BYTES)");
        return NULL;
    }
    bound = PyLong_AsSsize_t(args[2]);
    if (bound < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "setup_clients: CORK_BYTES must not be negative");
        }
        return NULL;
    }
    keep(&plain_socket_type, args[0]);
    keep(&frames_type, args[1]);
    cork_bytes = bound;
    Py_RETURN_NONE;
}

/* What send_corked does with a connection, as node/clients.py's send_corked decides it. */
enum { SEND_IT, LEAVE_IT, DROP_IT, FAILED };

/* Whether a connection's bytes go straight to its socket (SEND_IT, its descriptor in *fd), to
   _write (LEAVE_IT: something queued, or not a plain socket), or nowhere (DROP_IT: no stream, no
   socket); FAILED with an exception set where the Python version raises. */
static int
free_socket(PyObject *conn, int *fd)
{
    PyObject *stream, *buffer, *size, *sock;
    int verdict, empty;
    stream = PyObject_GetAttr(conn, str_stream);
    if (stream == NULL) {
        return FAILED;
    }
    if (stream == Py_None) {
        Py_DECREF(stream);
        return DROP_IT;
    }
    buffer = PyObject_GetAttr(stream, str_write_buffer);
    if (buffer == NULL) {
        Py_DECREF(stream);
        return FAILED;
    }
    if (buffer == Py_None) {
        Py_DECREF(buffer);
        Py_DECREF(stream);
        return LEAVE_IT;
    }
    size = PyObject_GetAttr(buffer, str_size);
    Py_DECREF(buffer);
    empty = size == NULL ? -1 : PyObject_Not(size);
    Py_XDECREF(size);
    if (empty < 0) {
        Py_DECREF(stream);
        return FAILED;
    }
    if (!empty) {
        Py_DECREF(stream);
        return LEAVE_IT;
    }
    sock = PyObject_GetAttr(stream, str_socket);
    Py_DECREF(stream);
    if (sock == NULL) {   /* as socket.send's AttributeError: gone */
        PyErr_Clear();
        return DROP_IT;
    }
    verdict = LEAVE_IT;
    if ((PyObject *)Py_TYPE(sock) == plain_socket_type) {
        *fd = PyObject_AsFileDescriptor(sock);
        verdict = SEND_IT;
        if (*fd < 0) {   /* closed: socket.send would fail, and the connection be dropped */
            PyErr_Clear();
            verdict = DROP_IT;
        }
    }
    Py_DECREF(sock);
    return verdict;
}

#define MOST_FRAMES 256   /* frames of one connection sent in one sendmsg; more go through _write */

/* One sendmsg(2) of the bytes objects of `frames` (a list); the bytes sent, or -1 with errno. */
static Py_ssize_t
send_frames(int fd, PyObject *frames, Py_ssize_t *size)
{
    struct iovec parts[MOST_FRAMES];
    struct msghdr message;
    Py_ssize_t count = PyList_GET_SIZE(frames), sent;
    *size = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *frame = PyList_GET_ITEM(frames, i);
        parts[i].iov_base = PyBytes_AS_STRING(frame);
        parts[i].iov_len = (size_t)PyBytes_GET_SIZE(frame);
        *size += PyBytes_GET_SIZE(frame);
    }
    memset(&message, 0, sizeof(message));
    message.msg_iov = parts;
    message.msg_iovlen = (size_t)count;
    do {
        sent = sendmsg(fd, &message, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    return sent;
}

/* Whether `data` is a list of 1 to MOST_FRAMES bytes objects (node/clients.py's _Frames). */
static int
is_frames(PyObject *data)
{
    Py_ssize_t count;
    if (!PyList_Check(data)) {
        return 0;
    }
    count = PyList_GET_SIZE(data);
    if (count < 1 || count > MOST_FRAMES) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyBytes_CheckExact(PyList_GET_ITEM(data, i))) {
            return 0;
        }
    }
    return 1;
}

/* send_corked(corked: dict) -> list

   node/clients.py, send_corked: for each connection -> bytes (or list of bytes, its frames) of
   `corked` whose stream has nothing queued and whose socket is a plain socket, one send(2) (or one
   sendmsg(2) of every frame). Returns (connection, what is left to write) for the others: more
   than MOST_FRAMES frames, a stream with something queued, another kind of socket, or what the
   kernel did not take (a memoryview of the rest). A connection whose
   stream is gone, or whose socket fails (its close is on its way), is dropped, as the Python
   function drops it. */
static PyObject *
send_corked(PyObject *module, PyObject *corked)
{
    PyObject *left, *conn, *data, *rest, *pair;
    Py_ssize_t position = 0;

    if (!PyDict_CheckExact(corked) || plain_socket_type == NULL) {
        PyErr_SetString(PyExc_TypeError, "send_corked(corked: dict), after setup_clients()");
        return NULL;
    }
    left = PyList_New(0);
    if (left == NULL) {
        return NULL;
    }
    while (PyDict_Next(corked, &position, &conn, &data)) {
        Py_ssize_t sent = 0, size = 0;
        int fd = -1, verdict, several;
        Py_INCREF(conn);   /* free_socket runs Python code: hold both */
        Py_INCREF(data);
        verdict = free_socket(conn, &fd);
        /* checked after free_socket, with nothing in between that could change the frames */
        several = !PyBytes_CheckExact(data);
        if (verdict == SEND_IT && several && !is_frames(data)) {
            verdict = LEAVE_IT;
        }
        rest = NULL;
        switch (verdict) {
        case FAILED:
            goto failed;
        case DROP_IT:
            goto next;
        case LEAVE_IT:
            rest = data;
            Py_INCREF(rest);
            break;
        default:
            if (several) {
                sent = send_frames(fd, data, &size);
            }
            else {
                size = PyBytes_GET_SIZE(data);
                do {
                    sent = send(fd, PyBytes_AS_STRING(data), size, MSG_DONTWAIT | MSG_NOSIGNAL);
                } while (sent < 0 && errno == EINTR);
            }
            if (sent == size || (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
                goto next;   /* all sent; or the connection is gone, its close on its way */
            }
            if (sent < 0) {
                sent = 0;
            }
            if (several) {   /* what is left of the frames, as _write would have it: one bytes object */
                PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
                PyObject *whole = empty == NULL ? NULL : PyObject_CallMethod(empty, "join", "O", data);
                Py_XDECREF(empty);
                rest = whole == NULL ? NULL : PyMemoryView_FromObject(whole);
                Py_XDECREF(whole);
            }
            else {
                rest = PyMemoryView_FromObject(data);
            }
            if (rest != NULL && sent) {
                Py_SETREF(rest, PySequence_GetSlice(rest, sent, PY_SSIZE_T_MAX));
            }
            if (rest == NULL) {
                goto failed;
            }
        }
        pair = PyTuple_Pack(2, conn, rest);
        Py_DECREF(rest);
        if (pair == NULL || PyList_Append(left, pair) < 0) {
            Py_XDECREF(pair);
            goto failed;
        }
        Py_DECREF(pair);
    next:
        Py_DECREF(conn);
        Py_DECREF(data);
        continue;
    failed:
        Py_DECREF(conn);
        Py_DECREF(data);
        Py_DECREF(left);
        return NULL;
    }
    return left;
}

static PyObject *str_closed_by_server;

/* Corks `frame` after `waiting`, what `conn` has corked already, as write_frame does: 1 corked,
   0 over CORK_BYTES together (or an entry node/clients.py does not make: write_frame's), -1 failed. */
static int
cork_after(PyObject *corked, PyObject *conn, PyObject *waiting, PyObject *frame)
{
    Py_ssize_t frame_size = PyBytes_GET_SIZE(frame), size;
    PyObject *frames, *total;
    int failed;
    if (PyBytes_CheckExact(waiting)) {
        size = PyBytes_GET_SIZE(waiting) + frame_size;
        if (size > cork_bytes) {
            return 0;
        }
        frames = PyObject_CallFunction(frames_type, "((OO))", waiting, frame);
        if (frames == NULL) {
            return -1;
        }
        total = PyLong_FromSsize_t(size);
        failed = total == NULL || PyObject_SetAttr(frames, str_frames_size, total) < 0
                 || PyDict_SetItem(corked, conn, frames) < 0;
        Py_XDECREF(total);
        Py_DECREF(frames);
        return failed ? -1 : 1;
    }
    if ((PyObject *)Py_TYPE(waiting) != frames_type) {
        return 0;
    }
    total = PyObject_GetAttr(waiting, str_frames_size);
    if (total == NULL) {
        return -1;
    }
    size = PyLong_CheckExact(total) ? PyLong_AsSsize_t(total) : -1;
    Py_DECREF(total);
    if (size < 0) {   /* not a size this module sets: write_frame says what it makes of it */
        PyErr_Clear();
        return 0;
    }
    if (size > cork_bytes - frame_size) {
        return 0;
    }
    total = PyLong_FromSsize_t(size + frame_size);
    failed = total == NULL || PyList_Append(waiting, frame) < 0
             || PyObject_SetAttr(waiting, str_frames_size, total) < 0;
    Py_XDECREF(total);
    return failed ? -1 : 1;
}

/* cork_all(conns: list, frame: bytes, corked: dict) -> list

   node/clients.py, cork_all: for each connection of `conns` whose stream has nothing queued and no
   close of ours under way, `frame` corked in `corked`, after what the connection has corked
   already while both stay within CORK_BYTES; returns the others (for write_frame, which says what
   becomes of each). */
static PyObject *
cork_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *conns, *frame, *corked, *rest;
    if (nargs != 3 || !PyList_CheckExact(args[0]) || !PyBytes_CheckExact(args[1]) || !PyDict_CheckExact(args[2])
            || frames_type == NULL) {
        PyErr_SetString(PyExc_TypeError, "cork_all(conns: list, frame: bytes, corked: dict), after setup_clients()");
        return NULL;
    }
    conns = args[0];
    frame = args[1];
    corked = args[2];
    rest = PyList_New(0);
    if (rest == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(conns); i++) {
        /* as the Python version reads it: a stream, a buffer, nothing in it, not closing; then what
           is corked already */
        PyObject *conn = PyList_GET_ITEM(conns, i), *stream, *buffer = NULL, *size = NULL, *closing = NULL;
        PyObject *waiting;
        int usable = 0, fine = 0, taken = 0, empty;
        Py_INCREF(conn);
        stream = PyObject_GetAttr(conn, str_stream);
        if (stream == NULL) {
            goto done;
        }
        if (stream != Py_None) {
            buffer = PyObject_GetAttr(stream, str_write_buffer);
            if (buffer == NULL) {
                goto done;
            }
            if (buffer != Py_None) {
                size = PyObject_GetAttr(buffer, str_size);
                empty = size == NULL ? -1 : PyObject_Not(size);
                if (empty < 0) {
                    goto done;
                }
                if (empty) {
                    closing = PyObject_GetAttr(conn, str_closed_by_server);
                    if (closing == NULL) {
                        goto done;
                    }
                    usable = closing == Py_None;
                }
            }
        }
        if (usable) {
            waiting = PyDict_GetItemWithError(corked, conn);
            if (waiting == NULL) {
                if (PyErr_Occurred() || PyDict_SetItem(corked, conn, frame) < 0) {
                    goto done;
                }
                taken = 1;
            }
            else {
                Py_INCREF(waiting);
                taken = cork_after(corked, conn, waiting, frame);
                Py_DECREF(waiting);
                if (taken < 0) {
                    goto done;
                }
            }
        }
        fine = 1;
    done:
        Py_XDECREF(stream);
        Py_XDECREF(buffer);
        Py_XDECREF(size);
        Py_XDECREF(closing);
        if (!fine || (!taken && PyList_Append(rest, conn) < 0)) {
            Py_DECREF(conn);
            Py_DECREF(rest);
            return NULL;
        }
        Py_DECREF(conn);
    }
    return rest;
}

/* --- the API port's request heads (node/api_fast.py) ------------------------------------------------ */

static PyObject *head_targets, *head_python;   /* _TARGETS (request line -> method) and the Python _head */

static PyObject *
setup_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyDict_CheckExact(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "setup_head(targets, _head)");
        return NULL;
    }
    keep(&head_targets, args[0]);
    keep(&head_python, args[1]);
    Py_RETURN_NONE;
}

/* Whether text[0:n] is `word` (lower-case ASCII) in any ASCII case. */
static int
same_word(const unsigned char *text, Py_ssize_t n, const char *word)
{
    Py_ssize_t i = 0;
    for (; i < n && word[i]; i++) {
        unsigned char c = text[i];
        if (c >= 'A' && c <= 'Z') {
            c += 'a' - 'A';
        }
        if (c != (unsigned char)word[i]) {
            return 0;
        }
    }
    return i == n && word[i] == '\0';
}

/* Where the next "\r\n" at or after `pos` starts, or `size`. */
static Py_ssize_t
line_end(const unsigned char *data, Py_ssize_t size, Py_ssize_t pos)
{
    for (Py_ssize_t i = pos; i + 1 < size; i++) {
        if (data[i] == '\r' && data[i + 1] == '\n') {
            return i;
        }
    }
    return size;
}

/* A header's value as the Python function keeps it: stripped of spaces and tabs (stripped[0:*length]). */
static const unsigned char *
stripped(const unsigned char *value, Py_ssize_t *length)
{
    Py_ssize_t start = 0, end = *length;
    while (start < end && (value[start] == ' ' || value[start] == '\t')) {
        start++;
    }
    while (end > start && (value[end - 1] == ' ' || value[end - 1] == '\t')) {
        end--;
    }
    *length = end - start;
    return value + start;
}

/* parse_head(head) -> (method, headers, length, close) or None

   node/api_fast.py, _head, for a head whose header names are ASCII and whose Content-Type, if any, is
   printable ASCII; anything else goes to the Python function. */
static PyObject *
parse_head(PyObject *module, PyObject *head)
{
    const unsigned char *data, *length_at = NULL, *type_at = NULL, *connection_at = NULL;
    Py_ssize_t size, first, pos, length_size = 0, type_size = 0, connection_size = 0;
    PyObject *line, *method, *headers, *key, *value, *content_length, *result;
    int refused = 0;   /* Transfer-Encoding, Expect or Upgrade */
    long long bytes = 0;

    if (!PyBytes_CheckExact(head) || head_targets == NULL) {
        return call_python(head_python, &head, 1);
    }
    data = (const unsigned char *)PyBytes_AS_STRING(head);
    size = PyBytes_GET_SIZE(head);
    first = line_end(data, size, 0);
    line = PyBytes_FromStringAndSize((const char *)data, first);
    if (line == NULL) {
        return NULL;
    }
    method = PyDict_GetItemWithError(head_targets, line);
    Py_DECREF(line);
    if (method == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    headers = PyDict_New();
    if (headers == NULL) {
        return NULL;
    }
    for (pos = first + 2; first < size; pos += 2) {
        Py_ssize_t end = line_end(data, size, pos), colon = -1, value_size;
        const unsigned char *name = data + pos, *text;
        for (Py_ssize_t i = pos; i < end; i++) {
            if (data[i] == '\r' || data[i] == '\n') {
                goto none;
            }
            if (colon < 0 && data[i] == ':') {
                colon = i;
            }
        }
        if (colon <= pos) {   /* no colon, or no name before it */
            goto none;
        }
        for (Py_ssize_t i = pos; i < colon; i++) {
            if (data[i] == ' ' || data[i] == '\t') {
                goto none;
            }
            if (data[i] >= 0x80) {   /* a Latin-1 name: str.lower's to lower */
                goto python;
            }
        }
        key = PyUnicode_New(colon - pos, 127);
        if (key == NULL) {
            goto error;
        }
        for (Py_ssize_t i = pos; i < colon; i++) {
            unsigned char c = data[i];
            PyUnicode_1BYTE_DATA(key)[i - pos] = (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
        }
        switch (PyDict_Contains(headers, key)) {
        case 0:
            break;
        case 1:
            Py_DECREF(key);
            goto none;
        default:
            Py_DECREF(key);
            goto error;
        }
        value_size = end - colon - 1;
        text = stripped(data + colon + 1, &value_size);
        value = PyUnicode_DecodeLatin1((const char *)text, value_size, NULL);
        if (value == NULL || PyDict_SetItem(headers, key, value) < 0) {
            Py_XDECREF(value);
            Py_DECREF(key);
            goto error;
        }
        Py_DECREF(value);
        Py_DECREF(key);
        if (same_word(name, colon - pos, "content-length")) {
            length_at = text, length_size = value_size;
        }
        else if (same_word(name, colon - pos, "content-type")) {
            type_at = text, type_size = value_size;
        }
        else if (same_word(name, colon - pos, "connection")) {
            connection_at = text, connection_size = value_size;
        }
        else if (same_word(name, colon - pos, "transfer-encoding") || same_word(name, colon - pos, "expect")
                 || same_word(name, colon - pos, "upgrade")) {
            refused = 1;
        }
        if (end == size) {
            break;
        }
        pos = end;
    }
    /* api_http.content_length: 1 to 18 digits */
    if (length_at == NULL || length_size < 1 || length_size > 18 || refused) {
        goto none;
    }
    for (Py_ssize_t i = 0; i < length_size; i++) {
        if (length_at[i] < '0' || length_at[i] > '9') {
            goto none;
        }
        bytes = bytes * 10 + (length_at[i] - '0');
    }
    /* api_http.json_type: none, or "application/json" before any ";", whitespace around it aside */
    if (type_at != NULL) {
        Py_ssize_t cut = 0;
        for (Py_ssize_t i = 0; i < type_size; i++) {
            if (type_at[i] >= 0x80 || (type_at[i] < 0x20 && type_at[i] != '\t')) {
                goto python;   /* what str.strip also strips, or str.lower also lowers */
            }
        }
        while (cut < type_size && type_at[cut] != ';') {
            cut++;
        }
        type_at = stripped(type_at, &cut);
        if (!same_word(type_at, cut, "application/json")) {
            goto none;
        }
    }
    if (connection_at != NULL && !same_word(connection_at, connection_size, "keep-alive")
            && !same_word(connection_at, connection_size, "close")) {
        goto none;
    }
    content_length = PyLong_FromLongLong(bytes);
    if (content_length == NULL) {
        goto error;
    }
    result = PyTuple_New(4);
    if (result == NULL) {
        Py_DECREF(content_length);
        goto error;
    }
    Py_INCREF(method);
    PyTuple_SET_ITEM(result, 0, method);
    PyTuple_SET_ITEM(result, 1, headers);
    PyTuple_SET_ITEM(result, 2, content_length);
    value = (connection_at != NULL && same_word(connection_at, connection_size, "close")) ? Py_True : Py_False;
    Py_INCREF(value);
    PyTuple_SET_ITEM(result, 3, value);
    return result;

none:
    Py_DECREF(headers);
    Py_RETURN_NONE;
python:
    Py_DECREF(headers);
    return call_python(head_python, &head, 1);
error:
    Py_DECREF(headers);
    return NULL;
}

/* --- an HTTP body and mesh.publish's parameters (cluster/protocol.py) --------------------------------- */

static PyObject *publish_params_type, *publish_python, *http_body_python;

static PyObject *
setup_publish(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyType_Check(args[0]) || !PyType_IsSubtype((PyTypeObject *)args[0], &PyTuple_Type)
            || !PyCallable_Check(args[1]) || !PyCallable_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "setup_publish(PublishParams, parse_publish, parse_http_body)");
        return NULL;
    }
    keep(&publish_params_type, args[0]);
    keep(&publish_python, args[1]);
    keep(&http_body_python, args[2]);
    Py_RETURN_NONE;
}

/* parse_http_body(body) -> dict

   cluster/protocol.py, parse_http_body, for bytes in UTF-8 that strict JSON reads into an object, with
   no `\ud` escape and no deeper nesting than ujson reads; anything else goes to the Python function. */
static PyObject *
parse_http_body(PyObject *module, PyObject *body)
{
    const unsigned char *data;
    Py_ssize_t size, brackets = 0;
    PyObject *value;

    if (!PyBytes_CheckExact(body) || strict_decode == NULL || PyBytes_GET_SIZE(body) == 0) {
        return call_python(http_body_python, &body, 1);
    }
    data = (const unsigned char *)PyBytes_AS_STRING(body);
    size = PyBytes_GET_SIZE(body);
    for (Py_ssize_t i = 0; i < size; i++) {
        brackets += (data[i] == '[' || data[i] == '{');
        if (data[i] == '\\' && i + 2 < size && data[i + 1] == 'u' && (data[i + 2] == 'd' || data[i + 2] == 'D')) {
            return call_python(http_body_python, &body, 1);   /* a surrogate escape, maybe */
        }
    }
    /* msgspec refuses what is not UTF-8 and lone surrogates today; checked here all the same, so that
       this function reads what the Python one reads whatever msgspec's version says. */
    if (brackets > UJSON_DEPTH || !is_utf8(data, size)) {
        return call_python(http_body_python, &body, 1);
    }
    value = PyObject_CallOneArg(strict_decode, body);
    if (value == NULL || !PyDict_CheckExact(value)) {
        PyErr_Clear();
        Py_XDECREF(value);
        return call_python(http_body_python, &body, 1);
    }
    return value;
}

/* parse_publish(params, prefix="p.") -> PublishParams

   cluster/protocol.py, parse_publish, for an object whose `c` is one channel name of 1 to 255 printable
   ASCII characters other than space and whose `d` is a string of text (`t` absent or "text"); anything
   else goes to the Python function. */
static PyObject *
parse_publish(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *channel, *channels, *encoded, *payload;
    Py_ssize_t length;
    const Py_UCS1 *name;

    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) {   /* prefix=...: only names the fields in errors */
        if (publish_python == NULL) {
            return call_python(NULL, args, nargs);
        }
        return PyObject_Vectorcall(publish_python, args, nargs, kwnames);
    }
    if (nargs < 1 || nargs > 2 || publish_params_type == NULL || payload_type == NULL || !PyDict_CheckExact(args[0])
            || !ascii_c_and_text(args[0], &channel, &encoded)) {
        return call_python(publish_python, args, nargs);
    }
    length = PyUnicode_GET_LENGTH(channel);
    name = PyUnicode_1BYTE_DATA(channel);
    /* MAX_NAME_BYTES, and no whitespace or control character (_BAD_NAME_CHAR) */
    if (length < 1 || length > 255 || !all_within(name, length, '!', '~')) {
        Py_DECREF(encoded);
        return call_python(publish_python, args, nargs);
    }
    channels = PyList_New(1);
    if (channels == NULL) {
        Py_DECREF(encoded);
        return NULL;
    }
    Py_INCREF(channel);
    PyList_SET_ITEM(channels, 0, channel);
    Py_INCREF(Py_False);
    payload = pair_of(payload_type, encoded, Py_False);
    if (payload == NULL) {
        Py_DECREF(channels);
        return NULL;
    }
    return pair_of(publish_params_type, channels, payload);
}

static PyMethodDef methods[] = {
    {"text_frame", (PyCFunction)(void (*)(void))text_frame, METH_FASTCALL,
     "The whole masked text frame at data[pos:]: (end, text or None), or None."},
    {"encode_ws_frame", (PyCFunction)(void (*)(void))encode_ws_frame, METH_FASTCALL | METH_KEYWORDS,
     "One unmasked, unfragmented server-to-client WebSocket frame."},
    {"set_python", (PyCFunction)(void (*)(void))set_python, METH_FASTCALL,
     "set_python(name, function): the Python version of a C function, for what is not the common case."},
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL,
     "setup(decode, method_names, WsRequest, SendParams, Payload, parse_ws_request, parse_send)."},
    {"parse_ws_request", (PyCFunction)(void (*)(void))parse_ws_request, METH_FASTCALL,
     "cluster/protocol.py, parse_ws_request."},
    {"parse_send", (PyCFunction)(void (*)(void))parse_send, METH_FASTCALL | METH_KEYWORDS,
     "cluster/protocol.py, parse_send."},
    {"set_buckets", (PyCFunction)set_buckets, METH_O, "set_buckets(bounds): the histograms' upper bounds."},
    {"observe", (PyCFunction)(void (*)(void))observe, METH_FASTCALL, "node/metrics.py, observe."},
    {"request_frame", (PyCFunction)(void (*)(void))request_frame, METH_FASTCALL, "cluster/mesh.py, request_frame."},
    {"batched_replies", (PyCFunction)batched_replies, METH_O, "cluster/mesh.py, batched_replies_python."},
    {"setup_mesh", (PyCFunction)(void (*)(void))setup_mesh, METH_FASTCALL, "setup_mesh(Request, Send, Publish)."},
    {"read_common_request", (PyCFunction)read_common_request, METH_O,
     "cluster/mesh.py, read_request, for a SEND or a PUB."},
    {"setup_clients", (PyCFunction)(void (*)(void))setup_clients, METH_FASTCALL,
     "setup_clients(socket.socket, _Frames, CORK_BYTES)."},
    {"send_corked", (PyCFunction)send_corked, METH_O, "node/clients.py, send_corked."},
    {"cork_all", (PyCFunction)(void (*)(void))cork_all, METH_FASTCALL, "node/clients.py, cork_all."},
    {"setup_head", (PyCFunction)(void (*)(void))setup_head, METH_FASTCALL, "setup_head(targets, _head)."},
    {"parse_head", (PyCFunction)parse_head, METH_O, "node/api_fast.py, _head."},
    {"setup_publish", (PyCFunction)(void (*)(void))setup_publish, METH_FASTCALL,
     "setup_publish(PublishParams, parse_publish, parse_http_body)."},
    {"parse_http_body", (PyCFunction)parse_http_body, METH_O, "cluster/protocol.py, parse_http_body."},
    {"parse_publish", (PyCFunction)(void (*)(void))parse_publish, METH_FASTCALL | METH_KEYWORDS,
     "cluster/protocol.py, parse_publish."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "cluster._speedups",
    "C versions of a few functions of the per-request path (cluster/speedups.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    struct { PyObject **slot; const char *text; } names[] = {
        {&str_i, "i"}, {&str_id, "id"}, {&str_m, "m"}, {&str_p, "p"}, {&str_c, "c"}, {&str_d, "d"},
        {&str_t, "t"}, {&str_text, "text"}, {&str_stream, "stream"}, {&str_write_buffer, "_write_buffer"},
        {&str_size, "_size"}, {&str_socket, "socket"}, {&str_closed_by_server, "_closed_by_server"},
        {&str_frames_size, "size"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&module);
}
