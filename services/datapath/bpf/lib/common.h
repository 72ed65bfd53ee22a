/* Common definitions of cilia's datapath: marks, directions, verdicts, helpers. */
#ifndef CILIA_COMMON_H
#define CILIA_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>

#ifndef PIN_ROOT
#error "PIN_ROOT must be defined (the bpffs directory of this node's maps)"
#endif

/* skb->mark: bits 8-11 carry a magic, the upper bits its argument. */
#define MARK_MAGIC_MASK   0x00000F00
#define MARK_JUDGED       0x00000A00  /* judged by from-container: to-container does not judge again */
#define MARK_TO_PROXY     0x00000B00  /* steer to the proxy: bits 16-31 = proxy port (nft rules act on it) */
#define MARK_FROM_PROXY   0x00000C00  /* sent by the node's proxy: bits 12-31 = source identity */
#define MARK_PROXY_INGRESS_DONE 0x00000080  /* with FROM_PROXY: the destination's L7 ingress was applied */

#define DIR_UNKNOWN 0
#define DIR_INGRESS 1
#define DIR_EGRESS  2

#define VERDICT_FORWARDED  1
#define VERDICT_DROPPED    2
#define VERDICT_REDIRECTED 3

#define EVENT_DROP           1
#define EVENT_TRACE          4
#define EVENT_POLICY_VERDICT 5

#define TRACE_TO_LXC   0
#define TRACE_TO_PROXY 1
#define TRACE_TO_STACK 3
#define TRACE_TO_OVERLAY 4
#define TRACE_FROM_LXC 5
#define TRACE_FROM_OVERLAY 9
#define TRACE_FROM_NETWORK 10

#define DROP_INVALID_SOURCE_IP  132
#define DROP_POLICY             133
#define DROP_INVALID_PACKET     134
#define DROP_CT_INVALID_HDR     135
#define DROP_UNSUPPORTED_L3     139
#define DROP_UNKNOWN_L4         142
#define DROP_FRAG_NOT_SUPPORTED 157
#define DROP_NO_SERVICE         158
#define DROP_NO_TUNNEL_ENDPOINT 160
#define DROP_PROXY_NOT_BOUND    178
#define DROP_POLICY_DENY        181

#define MATCH_NONE       0
#define MATCH_L3_ONLY    1
#define MATCH_L3_L4      2
#define MATCH_L4_ONLY    3
#define MATCH_ALL        4
#define MATCH_L3_PROTO   5
#define MATCH_PROTO_ONLY 6

#define TCP_FLAG_FIN_ 0x01
#define TCP_FLAG_SYN_ 0x02
#define TCP_FLAG_RST_ 0x04
#define TCP_FLAG_PSH_ 0x08
#define TCP_FLAG_ACK_ 0x10

#define IDENTITY_HOST  1
#define IDENTITY_WORLD 2
#define IDENTITY_REMOTE_NODE 6

/* The address a pod's connection to itself through a service is SNATed to (Cilium's IPV4_LOOPBACK). */
#define IPV4_LOOPBACK_BE 0x012AFEA9   /* 169.254.42.1 in network order */

#define ETH_P_ARP_BE  0x0608   /* htons(ETH_P_ARP) */
#define ETH_P_IP_BE   0x0008   /* htons(ETH_P_IP) */
#define ETH_P_IPV6_BE 0xDD86   /* htons(ETH_P_IPV6) */
#define IPPROTO_ICMPV6_ 58

/* What one packet looks like to policy: the 5-tuple plus what the parser learned. */
struct pkt {
	__u32 saddr;     /* network order */
	__u32 daddr;
	__u16 sport;     /* network order; ICMP echo: id in sport (request) or dport (reply) */
	__u16 dport;
	__u16 policy_port; /* network order: the port policy looks at (ICMP: the type) */
	__u8  proto;
	__u8  tcp_flags;
	__u8  icmp_type;
	__u8  icmp_code;
	__u8  is_fragment;
	__u8  pad;
	__u32 len;
	__u16 l4_off;    /* offset of the L4 header from the start of the frame */
	__u16 pad2;
};

#endif
