/* Decoding a region of a JPEG with libjpeg-turbo: the rows above and below the region are skipped
 * (jpeg_skip_scanlines: entropy-decoded, not transformed) and the columns outside it are not
 * transformed (jpeg_crop_scanline). A training crop covers about half of a photo, and the inverse
 * DCT, upsampling and colour conversion are most of a decode, so this saves about half of its
 * time. The pixels are those of the full decode (what Pillow gives), bit for bit:
 * albef_ds/data/images.py uses this module, tests/unit/test_jpeg_region.py holds the two equal.
 * The whole file is still read to its end, so libjpeg reports corrupt or truncated data wherever
 * it lies, as it does to Pillow.
 *
 * Built by setup.py against the system's libjpeg-turbo (Debian: libjpeg62-turbo-dev); where it
 * cannot be built, albef_ds/data/images.py decodes with Pillow instead and says so once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

#ifndef LIBJPEG_TURBO_VERSION
#error "albef_ds/data/_jpeg.c needs libjpeg-turbo (jpeg_skip_scanlines, jpeg_crop_scanline)"
#endif

enum { DECODED = 0, WARNED = 1, FAILED = -1 };

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int warned;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct error_manager *err = (struct error_manager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* libjpeg reports corrupt but decodable data as warnings (level -1) and goes on; the caller then
 * decodes with Pillow, so such a file gives exactly what it gave before. Trace messages
 * (level >= 0) are ignored. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) ((struct error_manager *)cinfo->err)->warned = 1;
}

static void start(struct jpeg_decompress_struct *cinfo, struct error_manager *err,
                  const unsigned char *data, size_t size) {
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->warned = 0;
    err->message[0] = '\0';
    jpeg_create_decompress(cinfo);
    jpeg_mem_src(cinfo, data, (unsigned long)size);
}

/* RGB rows [top, top + height) x columns [left, left + width) into out (height x width x 3).
 * Runs without the GIL: no Python API in here. */
static int decode(const unsigned char *data, size_t size, int left, int top, int width, int height,
                  unsigned char *out, char *message) {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    unsigned char *volatile row = NULL;
    if (setjmp(err.jump)) {
        strcpy(message, err.message);
        jpeg_destroy_decompress(&cinfo);
        free(row);
        return FAILED;
    }
    start(&cinfo, &err, data, size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    jpeg_start_decompress(&cinfo);
    if (left < 0 || top < 0 || width <= 0 || height <= 0 || (JDIMENSION)(left + width) > cinfo.output_width
        || (JDIMENSION)(top + height) > cinfo.output_height) {
        snprintf(message, JMSG_LENGTH_MAX, "region (%d, %d, %d x %d) outside the %u x %u image",
                 left, top, width, height, cinfo.output_width, cinfo.output_height);
        jpeg_destroy_decompress(&cinfo);
        return FAILED;
    }
    /* The decoded columns reach one chroma sample beyond the region on both sides: fancy
     * upsampling interpolates an edge pixel's chroma from its neighbour, and would otherwise
     * repeat the edge of the cropped columns (libjpeg aligns the start down to a block). */
    int margin = cinfo.max_h_samp_factor;
    int first = left - margin < 0 ? 0 : left - margin;
    int end = left + width + margin;
    if ((JDIMENSION)end > cinfo.output_width) end = (int)cinfo.output_width;
    JDIMENSION x_offset = (JDIMENSION)first, columns = (JDIMENSION)(end - first);
    jpeg_crop_scanline(&cinfo, &x_offset, &columns);
    row = malloc((size_t)columns * 3);
    if (row == NULL) {
        strcpy(message, "out of memory");
        jpeg_destroy_decompress(&cinfo);
        return FAILED;
    }
    if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    size_t shift = (size_t)(left - (int)x_offset) * 3, stride = (size_t)width * 3;
    for (int y = 0; y < height; y++) {
        JSAMPROW rows[1] = {row};
        jpeg_read_scanlines(&cinfo, rows, 1);
        memcpy(out + (size_t)y * stride, row + shift, stride);
    }
    /* Read on to the end of the file, for libjpeg's errors and warnings: skip to the last row
     * (skipping to the end would return without reading) and decode that one row. */
    if (cinfo.output_scanline + 1 < cinfo.output_height)
        jpeg_skip_scanlines(&cinfo, cinfo.output_height - 1 - cinfo.output_scanline);
    if (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW rows[1] = {row};
        jpeg_read_scanlines(&cinfo, rows, 1);
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    free(row);
    return err.warned ? WARNED : DECODED;
}

/* read_header(data) -> (width, height, supported): supported is false where the region decoder
 * does not apply (CMYK / YCCK, or not 8 bits per sample) and Pillow decodes instead. */
static PyObject *read_header(PyObject *self, PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*:read_header", &data)) return NULL;
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, err.message);
        return NULL;
    }
    start(&cinfo, &err, data.buf, (size_t)data.len);
    jpeg_read_header(&cinfo, TRUE);
    int supported = cinfo.data_precision == 8 && (cinfo.jpeg_color_space == JCS_YCbCr
                    || cinfo.jpeg_color_space == JCS_RGB || cinfo.jpeg_color_space == JCS_GRAYSCALE);
    PyObject *result = Py_BuildValue("(IIO)", cinfo.image_width, cinfo.image_height,
                                     supported ? Py_True : Py_False);
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return result;
}

/* decode_region(data, left, top, width, height, out) -> clean: writes the region's RGB pixels
 * (height x width x 3 bytes) into the writable buffer out; clean is false when libjpeg warned of
 * corrupt data. Raises ValueError when libjpeg fails. */
static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    int left, top, width, height;
    if (!PyArg_ParseTuple(args, "y*iiiiw*:decode_region", &data, &left, &top, &width, &height, &out))
        return NULL;
    char message[JMSG_LENGTH_MAX];
    int status = FAILED;
    if (width > 0 && height > 0 && out.len >= (Py_ssize_t)width * height * 3) {
        Py_BEGIN_ALLOW_THREADS
        status = decode(data.buf, (size_t)data.len, left, top, width, height, out.buf, message);
        Py_END_ALLOW_THREADS
    } else {
        snprintf(message, sizeof message, "the output holds %zd bytes, not %d x %d x 3", out.len, height, width);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (status == FAILED) {
        PyErr_SetString(PyExc_ValueError, message);
        return NULL;
    }
    return PyBool_FromLong(status == DECODED);
}

static PyMethodDef methods[] = {
    {"read_header", read_header, METH_VARARGS, "(width, height, supported) of a JPEG's header"},
    {"decode_region", decode_region, METH_VARARGS, "a region's RGB pixels into a writable buffer"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg", "JPEG region decoding (libjpeg-turbo)", -1, methods};

PyMODINIT_FUNC PyInit__jpeg(void) { return PyModule_Create(&module); }
