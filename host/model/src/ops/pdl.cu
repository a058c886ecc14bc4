// Programmatic dependent launch (ops/pdl.rs), for a module compiled with ADAPTERLAB_PDL
// (compute_90, the kernel launched with the attribute): a block may start while the kernel
// before it finishes; GRID_WAIT() waits for that kernel to be done before anything it wrote is
// read or anything is written. With ADAPTERLAB_PDL_EARLY a block lets the next kernel (where
// that one is launched with PDL) be scheduled as soon as it starts, so that kernel's blocks take
// the SMs this one's tail leaves idle and do what comes before their own wait there; otherwise
// that happens as this kernel's blocks exit. Elsewhere both are no-ops.
#ifdef ADAPTERLAB_PDL
#define GRID_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#else
#define GRID_WAIT()
#endif
#ifdef ADAPTERLAB_PDL_EARLY
#define GRID_LAUNCH_DEPENDENTS() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define GRID_LAUNCH_DEPENDENTS()
#endif
