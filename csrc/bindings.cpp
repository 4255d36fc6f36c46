// oplora._cpu: the Python face of the C++ CPU backend -- the only file here that knows Python.
//
// Every entry point takes buffers (NumPy arrays, e.g. zero-copy views of CPU tensors from
// tensor.numpy(), or anything with the buffer protocol), checks dtype, shape and C-contiguity, and
// raises ValueError saying what is wrong. Nothing is ever copied to fix a buffer up: outputs are
// written in place into the buffers given, so a copy would lose them (and, being accumulated while
// the rows are read, they must not overlap any input). Only float32 and float64 are taken; the
// bf16/fp16 policy (upcast once, in Python) lives in oplora/_backend.py. The GIL is released while
// the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <deque>
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

void check_chunks(const std::string& fn, const std::string& prefix, const std::vector<py::buffer>& xs,
                  const std::vector<py::buffer>& gs) {
    if (xs.empty() || xs.size() != gs.size())
        throw py::value_error("oplora._cpu." + fn + ": " + prefix + "xs and " + prefix + "gs must be non-empty lists "
                              "of the same length (one X_j, G_j pair per chunk), got " + std::to_string(xs.size()) +
                              " and " + std::to_string(gs.size()));
}

// One layer's buffers, checked: the argument names in messages are `prefix` + name ("qd", or
// "jobs[3].qd" in a grouped call). `keep` holds the views (and so the buffers) until the kernel is
// done; a deque, so that a view stays where it is while more are added.
template <class T>
oplora::RowPassArgs<T> job_args(const std::string& fn, const std::string& prefix, const std::vector<py::buffer>& xs,
                                const std::vector<py::buffer>& gs, const std::optional<py::buffer>& qd,
                                const std::optional<py::buffer>& qx, const std::optional<py::buffer>& px,
                                const std::optional<py::buffer>& pd, const std::optional<py::buffer>& sx,
                                const std::optional<py::buffer>& sg, std::deque<View<T>>& keep) {
    const std::string where = "oplora._cpu." + fn + ": ";
    check_chunks(fn, prefix, xs, gs);
    auto view = [&](const py::buffer& buf, const std::string& name, int dims, std::vector<int64_t> want,
                    bool writable) -> View<T>& {
        keep.emplace_back(buf, fn, prefix + name, dims, std::move(want), writable);
        return keep.back();
    };
    oplora::RowPassArgs<T> args;
    for (size_t j = 0; j < xs.size(); ++j) {
        const std::string idx = "[" + std::to_string(j) + "]";
        const View<T>& x = view(xs[j], "xs" + idx, 2, {-1, j ? args.n : -1}, false);
        args.n = x.cols;
        const View<T>& g = view(gs[j], "gs" + idx, 2, {x.rows, j ? args.m : -1}, false);
        args.m = g.cols;
        args.xs.push_back(x.ptr);
        args.gs.push_back(g.ptr);
        args.rows.push_back(x.rows);
    }
    // A right-hand side q (q_rows x K) and its product p (p_rows x K): given together or not at all.
    auto product = [&](const std::optional<py::buffer>& q, const std::optional<py::buffer>& p, const std::string& qn,
                       const std::string& pn, const char* p_shape, int64_t q_rows, int64_t p_rows, const T*& q_ptr,
                       int64_t& k, T*& p_ptr) {
        if (!q) return;
        const View<T>& qv = view(*q, qn, 2, {q_rows, -1}, false);
        if (!p)
            throw py::value_error(where + prefix + qn + " is given, so " + prefix + pn + " (" + p_shape +
                                  ") must be too");
        q_ptr = qv.ptr;
        k = qv.cols;
        p_ptr = view(*p, pn, 2, {p_rows, k}, true).ptr;
    };
    product(qd, px, "qd", "px", "n x Kd", args.m, args.n, args.qd, args.kd, args.px);
    product(qx, pd, "qx", "pd", "m x Kx", args.n, args.m, args.qx, args.kx, args.pd);
    if (sx || sg) {
        if (!(sx && sg))
            throw py::value_error(where + "give both " + prefix + "sx (n) and " + prefix + "sg (m), or neither");
        args.sx = view(*sx, "sx", 1, {args.n}, true).ptr;
        args.sg = view(*sg, "sg", 1, {args.m}, true).ptr;
        args.stats = true;
    }
    return args;
}

void check_threads(const std::string& fn, int threads) {
    if (threads < 1)
        throw py::value_error("oplora._cpu." + fn + ": threads must be >= 1, got " + std::to_string(threads));
}

// The element type of a call, from its first rows: float or double (or a ValueError naming them).
template <class F>
void dispatch(const std::string& fn, const std::string& name, const py::buffer& first, F&& run) {
    const std::string format = first.request().format;
    if (format == py::format_descriptor<float>::format())
        run(float());
    else if (format == py::format_descriptor<double>::format())
        run(double());
    else
        throw py::value_error("oplora._cpu." + fn + ": " + name + " must be float32 or float64 (upcast bf16/fp16 in "
                              "Python), got buffer format '" + format + "'");
}

void row_pass(const std::vector<py::buffer>& xs, const std::vector<py::buffer>& gs, std::optional<py::buffer> qd,
              std::optional<py::buffer> qx, std::optional<py::buffer> px, std::optional<py::buffer> pd,
              std::optional<py::buffer> sx, std::optional<py::buffer> sg, int threads) {
    const std::string fn = "row_pass";
    check_chunks(fn, "", xs, gs);
    check_threads(fn, threads);
    dispatch(fn, "xs[0]", xs[0], [&](auto zero) {
        using T = decltype(zero);
        std::deque<View<T>> keep;
        oplora::RowPassArgs<T> args = job_args<T>(fn, "", xs, gs, qd, qx, px, pd, sx, sg, keep);
        args.threads = threads;
        py::gil_scoped_release release;
        oplora::row_pass<T>(args);
    });
}

// jobs[i] = (xs, gs, qd, qx, px, pd, sx, sg), the arguments of row_pass for one layer.
void row_pass_many(const py::sequence& jobs, int threads) {
    const std::string fn = "row_pass_many";
    auto job = [&](size_t i) { return "oplora._cpu." + fn + ": jobs[" + std::to_string(i) + "]"; };
    check_threads(fn, threads);
    std::vector<py::sequence> items;
    for (size_t i = 0; i < jobs.size(); ++i) {
        const py::object item = jobs[i];
        if (!py::isinstance<py::sequence>(item) || py::len(item) != 8)
            throw py::value_error(job(i) + " must be a tuple (xs, gs, qd, qx, px, pd, sx, sg)");
        items.push_back(item.cast<py::sequence>());
    }
    if (items.empty()) return;
    auto buffers = [&](size_t i, int at, const char* name) {
        try {
            return items[i][at].cast<std::vector<py::buffer>>();
        } catch (const py::cast_error&) {
            throw py::value_error(job(i) + "." + name + " must be a list of buffers (NumPy arrays)");
        }
    };
    auto optional = [&](size_t i, int at, const char* name) -> std::optional<py::buffer> {
        const py::object obj = items[i][at];
        if (obj.is_none()) return std::nullopt;
        if (!py::isinstance<py::buffer>(obj))
            throw py::value_error(job(i) + "." + name + " must be a buffer (a NumPy array) or None");
        return obj.cast<py::buffer>();
    };
    const std::vector<py::buffer> first = buffers(0, 0, "xs");
    check_chunks(fn, "jobs[0].", first, buffers(0, 1, "gs"));
    dispatch(fn, "jobs[0].xs[0]", first[0], [&](auto zero) {
        using T = decltype(zero);
        std::deque<View<T>> keep;
        std::vector<oplora::RowPassArgs<T>> args;
        for (size_t i = 0; i < items.size(); ++i)
            args.push_back(job_args<T>(fn, "jobs[" + std::to_string(i) + "].", buffers(i, 0, "xs"),
                                       buffers(i, 1, "gs"), optional(i, 2, "qd"), optional(i, 3, "qx"),
                                       optional(i, 4, "px"), optional(i, 5, "pd"), optional(i, 6, "sx"),
                                       optional(i, 7, "sg"), keep));
        py::gil_scoped_release release;
        oplora::row_pass_many<T>(args.data(), args.size(), threads);
    });
}

// live[t] = whether row t of g carries gradient (oplora::live_rows).
void live_rows(const py::buffer& g, const py::buffer& live) {
    const std::string fn = "live_rows";
    py::buffer_info out = live.request(true);
    dispatch(fn, "g", g, [&](auto zero) {
        using T = decltype(zero);
        View<T> gv(g, fn, "g", 2, {-1, -1}, false);
        if (out.format != py::format_descriptor<uint8_t>::format() || out.itemsize != 1 || out.ndim != 1 ||
            out.shape[0] != gv.rows || (out.shape[0] > 1 && out.strides[0] != 1))
            throw py::value_error("oplora._cpu.live_rows: live must be a contiguous uint8 vector of " +
                                  std::to_string(gv.rows) + " entries (one per row of g)");
        py::gil_scoped_release release;
        oplora::live_rows<T>(gv.ptr, gv.rows, gv.cols, static_cast<uint8_t*>(out.ptr));
    });
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "oplora's C++ CPU backend: the fused row pass of the optimizer step";
    m.def("row_pass", &row_pass, py::arg("xs"), py::arg("gs"), py::arg("qd"), py::arg("qx"), py::arg("px"),
          py::arg("pd"), py::arg("sx"), py::arg("sg"), py::arg("threads") = 1,
          "px = sum_j X_j^T (G_j qd), pd = sum_j G_j^T (X_j qx), sx = sum_j colsum(X_j^2), sg = sum_j colsum(G_j^2),\n"
          "written into the given buffers (None: not computed), one pass over the rows. xs[j]: T_j x n, gs[j]: T_j x m,\n"
          "qd: m x Kd, qx: n x Kx, px: n x Kd, pd: m x Kx; all float32 or all float64, C-contiguous.");
    m.def("row_pass_many", &row_pass_many, py::arg("jobs"), py::arg("threads") = 1,
          "row_pass of every layer of a pass in one call: jobs[i] = (xs, gs, qd, qx, px, pd, sx, sg), the arguments\n"
          "of row_pass for layer i, all float32 or all float64 (the first job's). One team of up to `threads` threads\n"
          "runs the row blocks of all layers together (the same result for the same thread count). Errors name the\n"
          "job: 'jobs[3].qd has shape ...'.");
    m.def("live_rows", &live_rows, py::arg("g"), py::arg("live"),
          "live[t] = 1 where row t of g (T x m, float32 or float64, C-contiguous) holds a nonzero (NaN counts, -0.0\n"
          "does not), else 0, written into the uint8 vector live (T,); each row is read only up to its first nonzero.");
#ifdef _OPENMP
    m.attr("openmp") = py::bool_(true);
#else
    m.attr("openmp") = py::bool_(false);
#endif
}
