/* The maps of cilia's datapath, pinned under PIN_ROOT; mirrored by services/datapath/maps.py. */
#ifndef CILIA_MAPS_H
#define CILIA_MAPS_H

#include "common.h"

#define PIN(name) PIN_ROOT "/" name

/* ipcache: prefix -> identity (endpoints of every node, node addresses, CIDR and FQDN identities). */
struct ipcache_key {
	__u32 prefixlen;
	__u32 addr;          /* network order */
};
struct ipcache_value {
	__u32 identity;
	__u32 tunnel_endpoint; /* network order; 0: local or directly reachable */
	__u8  flags;
	__u8  pad[3];
};
BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_value, ipcache, 524288, PIN("ipcache"), BPF_F_NO_PREALLOC);

/* Local endpoints by address. */
#define EP_F_INGRESS_ENFORCED 0x1
#define EP_F_EGRESS_ENFORCED  0x2
struct endpoint_info {
	__u32 ifindex;       /* host-side veth */
	__u32 ep_id;
	__u32 identity;
	__u8  flags;
	__u8  pad;
	__u8  host_mac[6];   /* MAC of the host-side veth (hairpin to the proxy rewrites to it) */
};
BPF_TABLE_PINNED("hash", __u32, struct endpoint_info, endpoints, 65536, PIN("endpoints"));

/* Policy: per endpoint, (remote identity or 0, direction, protocol, port prefix) -> verdict. */
struct policy_key {
	__u32 prefixlen;
	__u32 ep_id;
	__u32 sec_label;     /* remote identity; 0 = any */
	__u8  egress;
	__u8  protocol;      /* 0 = any (then the port is wildcarded too) */
	__u16 dport;         /* network order, so that ranges are prefixes */
};
#define POLICY_FULL_PREFIX (8 * (sizeof(struct policy_key) - 4))   /* 96 */
#define POLICY_STATIC_PREFIX 72  /* ep_id + sec_label + egress are always whole */
struct policy_entry {
	__u16 proxy_port;    /* host order; 0 = no redirect */
	__u8  deny;
	__u8  lpm_prefix_length; /* of protocol+port: 0, 8, 9..24 */
	__u8  proxy_priority;
	__u8  pad[3];
	__u32 cookie;        /* names the rule that produced the entry */
};
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct policy_entry, policy, 1048576, PIN("policy"), BPF_F_NO_PREALLOC);

/* Connection tracking, keyed by the tuple of the connection's first packet. */
struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8  proto;
	__u8  pad[3];
};
#define CT_F_REPLY_SEEN 0x1
#define CT_F_CLOSING    0x2
#define CT_F_PROXIED    0x4
#define CT_F_VERDICT_CACHED 0x8  /* allowed (no proxy) at policy revision `policy_rev` */
struct ct_entry {
	__u64 created;       /* bpf_ktime_get_ns */
	__u64 last_seen;
	__u64 packets;        /* at creation; per-packet counts live in the per-CPU metrics */
	__u64 bytes;
	__u64 reply_packets;
	__u64 reply_bytes;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 src_ep;
	__u32 dst_ep;
	__u32 cookie;
	__u16 proxy_port;
	__u8  flags;
	__u8  tcp_flags_seen;       /* union of flags seen in the original direction */
	__u8  tcp_flags_seen_reply; /* ... and in the reply direction */
	__u8  nat_flags;            /* CT_NAT_*: the connection went through a service frontend */
	__u16 nat_port;             /* the frontend's port (network order): replies get it back */
	__u32 policy_rev;           /* the policy revision the cached verdict was taken at */
	__u32 nat_addr;             /* the frontend's address (network order) */
	__u32 pad3;
};
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_entry, ct, 262144, PIN("ct"));

/* Counters by (reason, direction) at index reason * 4 + direction: reason 0 = forwarded, else the
 * drop reason. A per-CPU array: no hashing, no locking on the hot path. */
struct metrics_value {
	__u64 packets;
	__u64 bytes;
};
BPF_TABLE_PINNED("percpu_array", __u32, struct metrics_value, metrics, 1024, PIN("metrics"));

/* The policy revision: the agent bumps it after every batch of map writes, which invalidates the
 * verdicts cached in conntrack entries, so a revoked allow cuts an established flow. */
BPF_TABLE_PINNED("array", __u32, __u32, policy_rev, 1, PIN("policy_rev"));

/* Proxy ports a proxy has registered on this node; redirects to any other port fail closed. */
BPF_TABLE_PINNED("hash", __u16, __u8, proxy_ports, 256, PIN("proxy_ports"));

/* Node configuration the agent writes (CONFIG_*). */
#define CONFIG_OVERLAY_IFINDEX 0
#define CONFIG_NODE_IP 1   /* network order: the address outside traffic to a remote backend is SNATed to */
BPF_TABLE_PINNED("array", __u32, __u32, config, 4, PIN("config"));

#endif
