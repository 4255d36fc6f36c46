// oplora._cpu: the Python face of the C++ CPU backend -- the only file here that knows Python.
//
// Every entry point takes buffers (NumPy arrays, e.g. zero-copy views of CPU tensors from
// tensor.numpy(), or anything with the buffer protocol), checks dtype, shape and C-contiguity, and
// raises ValueError saying what is wrong. Nothing is ever copied to fix a buffer up: outputs are
// written in place into the buffers given, so a copy would lose them. Only float32 and float64 are
// taken; the bf16/fp16 policy (upcast once, in Python) lives in oplora/_backend.py. The GIL is
// released while the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "row_pass.h"

namespace py = pybind11;

namespace {

template <class T>
const char* dtype_name() {
    return sizeof(T) == 4 ? "float32" : "float64";
}

std::string shape_str(const std::vector<py::ssize_t>& shape) {
    std::ostringstream os;
    os << "(";
    for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
    os << (shape.size() == 1 ? ",)" : ")");
    return os.str();
}

// A checked view of a buffer: dtype T, `dims` dimensions, C-contiguous; `want` sizes (-1: any).
template <class T>
struct View {
    py::buffer_info info;
    T* ptr = nullptr;
    int64_t rows = 0, cols = 1;

    View(const py::buffer& buf, const std::string& fn, const std::string& name, int dims,
         std::vector<int64_t> want, bool writable) {
        info = buf.request(false);  // writability is checked below, with a message naming the argument
        const std::string where = "oplora._cpu." + fn + ": " + name;
        if (info.format != py::format_descriptor<T>::format() || info.itemsize != sizeof(T))
            throw py::value_error(where + " must be " + dtype_name<T>() + " (like the other operands), got buffer format '" +
                                  info.format + "'");
        if (info.ndim != dims)
            throw py::value_error(where + " must be " + std::to_string(dims) + "-D, got shape " + shape_str(info.shape));
        py::ssize_t expect = sizeof(T);
        for (int d = dims - 1; d >= 0; --d) {
            if (info.shape[d] > 1 && info.strides[d] != expect)
                throw py::value_error(where + " must be C-contiguous (call .contiguous() before; the binding never "
                                      "copies), got shape " + shape_str(info.shape) + " with strides " +
                                      shape_str(info.strides));
            expect *= info.shape[d];
        }
        for (int d = 0; d < dims; ++d) {
            if (want[d] >= 0 && info.shape[d] != want[d]) {
                std::ostringstream os;
                os << where << " has shape " << shape_str(info.shape) << " but dimension " << d << " must be "
                   << want[d];
                throw py::value_error(os.str());
            }
        }
        if (writable && info.readonly) throw py::value_error(where + " must be writable (it receives the result)");
        ptr = static_cast<T*>(info.ptr);
        rows = info.shape[0];
        cols = dims == 2 ? info.shape[1] : 1;
    }
};

template <class T>
void row_pass_impl(const std::vector<py::buffer>& xs, const std::vector<py::buffer>& gs,
                   const std::optional<py::buffer>& qd, const std::optional<py::buffer>& qx,
                   const std::optional<py::buffer>& px, const std::optional<py::buffer>& pd,
                   const std::optional<py::buffer>& sx, const std::optional<py::buffer>& sg, int threads) {
    const std::string fn = "row_pass";
    std::vector<View<T>> xv, gv;
    oplora::RowPassArgs<T> args;
    for (size_t j = 0; j < xs.size(); ++j) {
        const std::string idx = "[" + std::to_string(j) + "]";
        xv.emplace_back(xs[j], fn, "xs" + idx, 2, std::vector<int64_t>{-1, j ? args.n : -1}, false);
        args.n = xv.back().cols;
        gv.emplace_back(gs[j], fn, "gs" + idx, 2, std::vector<int64_t>{xv.back().rows, j ? args.m : -1}, false);
        args.m = gv.back().cols;
        args.xs.push_back(xv.back().ptr);
        args.gs.push_back(gv.back().ptr);
        args.rows.push_back(xv.back().rows);
    }
    std::optional<View<T>> qdv, qxv, pxv, pdv, sxv, sgv;
    if (qd) {
        qdv.emplace(*qd, fn, "qd", 2, std::vector<int64_t>{args.m, -1}, false);
        if (!px) throw py::value_error("oplora._cpu.row_pass: qd is given, so px (n x Kd) must be too");
        pxv.emplace(*px, fn, "px", 2, std::vector<int64_t>{args.n, qdv->cols}, true);
        args.qd = qdv->ptr;
        args.kd = qdv->cols;
        args.px = pxv->ptr;
    }
    if (qx) {
        qxv.emplace(*qx, fn, "qx", 2, std::vector<int64_t>{args.n, -1}, false);
        if (!pd) throw py::value_error("oplora._cpu.row_pass: qx is given, so pd (m x Kx) must be too");
        pdv.emplace(*pd, fn, "pd", 2, std::vector<int64_t>{args.m, qxv->cols}, true);
        args.qx = qxv->ptr;
        args.kx = qxv->cols;
        args.pd = pdv->ptr;
    }
    if (sx || sg) {
        if (!(sx && sg)) throw py::value_error("oplora._cpu.row_pass: give both sx (n) and sg (m), or neither");
        sxv.emplace(*sx, fn, "sx", 1, std::vector<int64_t>{args.n}, true);
        sgv.emplace(*sg, fn, "sg", 1, std::vector<int64_t>{args.m}, true);
        args.sx = sxv->ptr;
        args.sg = sgv->ptr;
        args.stats = true;
    }
    args.threads = threads;
    py::gil_scoped_release release;
    oplora::row_pass<T>(args);
}

void row_pass(const std::vector<py::buffer>& xs, const std::vector<py::buffer>& gs, std::optional<py::buffer> qd,
              std::optional<py::buffer> qx, std::optional<py::buffer> px, std::optional<py::buffer> pd,
              std::optional<py::buffer> sx, std::optional<py::buffer> sg, int threads) {
    if (xs.empty() || xs.size() != gs.size())
        throw py::value_error("oplora._cpu.row_pass: xs and gs must be non-empty lists of the same length (one X_j, "
                              "G_j pair per chunk), got " + std::to_string(xs.size()) + " and " +
                              std::to_string(gs.size()));
    if (threads < 1) throw py::value_error("oplora._cpu.row_pass: threads must be >= 1, got " + std::to_string(threads));
    const std::string format = xs[0].request().format;
    if (format == py::format_descriptor<float>::format())
        row_pass_impl<float>(xs, gs, qd, qx, px, pd, sx, sg, threads);
    else if (format == py::format_descriptor<double>::format())
        row_pass_impl<double>(xs, gs, qd, qx, px, pd, sx, sg, threads);
    else
        throw py::value_error("oplora._cpu.row_pass: xs[0] must be float32 or float64 (upcast bf16/fp16 in Python), "
                              "got buffer format '" + format + "'");
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "oplora's C++ CPU backend: the fused row pass of the optimizer step";
    m.def("row_pass", &row_pass, py::arg("xs"), py::arg("gs"), py::arg("qd"), py::arg("qx"), py::arg("px"),
          py::arg("pd"), py::arg("sx"), py::arg("sg"), py::arg("threads") = 1,
          "px = sum_j X_j^T (G_j qd), pd = sum_j G_j^T (X_j qx), sx = sum_j colsum(X_j^2), sg = sum_j colsum(G_j^2),\n"
          "written into the given buffers (None: not computed), one pass over the rows. xs[j]: T_j x n, gs[j]: T_j x m,\n"
          "qd: m x Kd, qx: n x Kx, px: n x Kd, pd: m x Kx; all float32 or all float64, C-contiguous.");
#ifdef _OPENMP
    m.attr("openmp") = py::bool_(true);
#else
    m.attr("openmp") = py::bool_(false);
#endif
}
