/* Flow events (drop, policy verdict, trace) to the agent over a pinned ring buffer; mirrored by
 * services/datapath/eventtypes.py (FlowEventC). */
#ifndef CILIA_EVENTS_H
#define CILIA_EVENTS_H

#include "common.h"
#include "maps.h"

struct flow_event {
	__u64 ts_ns;
	__u8  type;
	__u8  subtype;
	__u8  direction;
	__u8  verdict;
	__u8  proto;
	__u8  tcp_flags;
	__u8  match_type;
	__u8  is_reply;     /* 0 no, 1 yes, 2 unknown */
	__u32 ifindex;
	__u32 src_ep;
	__u32 dst_ep;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;        /* host order */
	__u16 dport;
	__u32 cookie;
	__u16 proxy_port;
	__u16 pad;
	__u32 pkt_len;
} __attribute__((packed));

/* The agent pins this ring buffer next to the maps after loading (bcc cannot pin a ring buffer
 * from C), so a restarted agent that reuses the pinned programs reads the same buffer. */
BPF_RINGBUF_OUTPUT(events, 256);

struct ctx_info {
	__u32 ifindex;
	__u32 src_ep;
	__u32 dst_ep;
	__u32 src_identity;
	__u32 dst_identity;
	__u8  direction;
};

static __always_inline void emit(const struct pkt *p, const struct ctx_info *c, __u8 type, __u8 subtype,
				 __u8 verdict, __u8 match_type, __u8 is_reply, __u32 cookie, __u16 proxy_port)
{
	struct flow_event ev = {};

	ev.ts_ns = bpf_ktime_get_ns();
	ev.type = type;
	ev.subtype = subtype;
	ev.direction = c->direction;
	ev.verdict = verdict;
	ev.proto = p->proto;
	ev.tcp_flags = p->tcp_flags;
	ev.match_type = match_type;
	ev.is_reply = is_reply;
	ev.ifindex = c->ifindex;
	ev.src_ep = c->src_ep;
	ev.dst_ep = c->dst_ep;
	ev.src_identity = c->src_identity;
	ev.dst_identity = c->dst_identity;
	ev.saddr = p->saddr;
	ev.daddr = p->daddr;
	if (p->proto == IPPROTO_ICMP) {
		ev.sport = ((__u16)p->icmp_type << 8) | p->icmp_code;
		ev.dport = bpf_ntohs(p->sport | p->dport);
	} else {
		ev.sport = bpf_ntohs(p->sport);
		ev.dport = bpf_ntohs(p->dport);
	}
	ev.cookie = cookie;
	ev.proxy_port = proxy_port;
	ev.pkt_len = p->len;
	events.ringbuf_output(&ev, sizeof(ev), 0);
}

static __always_inline void count(__u8 reason, __u8 dir, __u32 len)
{
	__u32 idx = ((__u32)reason << 2) | (dir & 3);
	struct metrics_value *v = metrics.lookup(&idx);

	if (v) {
		v->packets += 1;
		v->bytes += len;
	}
}

#endif
