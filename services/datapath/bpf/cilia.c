/* Every program of a node's datapath, compiled once per agent start (bcc) and shared by all its
 * endpoints: the endpoint programs, the overlay programs, and the node's uplink program. */
#include "bpf_lxc.c"
#include "bpf_overlay.c"
#include "bpf_host.c"
