/* Every program of a node's datapath, compiled once per agent start (bcc) and shared by all its
 * endpoints: the endpoint programs, then the overlay programs. */
#include "bpf_lxc.c"
#include "bpf_overlay.c"
