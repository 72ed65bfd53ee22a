/* Service load balancing, as Cilium's bpf/lib/lb.h does it at the source endpoint's from-container:
 * a packet to a service frontend (ClusterIP, LoadBalancer or external IP and port) gets a backend,
 * chosen at random once per connection (the lb_ct map remembers it, per client and source port;
 * sessionAffinity: ClientIP per client for a while), and is DNATed to it before policy is applied,
 * so policy sees the backend's identity and port. Conntrack keeps the frontend, and replies get it
 * back (lb_rev_nat) wherever they first meet the datapath of the client's node. A pod reaching
 * itself through its service is also SNATed to IPV4_LOOPBACK, as Cilium does, since a pod drops
 * packets from its own address. Mirrored by services/datapath/maps.py. */
#ifndef CILIA_LB_H
#define CILIA_LB_H

#include "common.h"
#include "maps.h"
#include "conntrack.h"

#define IP_CSUM_OFF (ETH_HLEN + 10)
#define IP_SADDR_OFF (ETH_HLEN + 12)
#define IP_DADDR_OFF (ETH_HLEN + 16)

/* Frontend -> backend slots: slot 0 holds the service (count, flags), slots 1..count its backends. */
struct lb_key {
	__u32 address;   /* network order */
	__u16 dport;     /* network order */
	__u16 slot;
	__u8  proto;
	__u8  pad[3];
};
#define SVC_F_AFFINITY   0x1   /* sessionAffinity: ClientIP */
#define SVC_F_EXTERNAL   0x2   /* a LoadBalancer or external IP: reachable from outside the cluster */
#define SVC_F_LOCAL_ONLY 0x4   /* externalTrafficPolicy: Local (outside traffic to local backends only) */
struct lb_service {
	__u32 backend_id;        /* slots 1..count */
	__u16 count;             /* slot 0: number of backends */
	__u16 rev_nat_id;        /* slot 0: the frontend's number (affinity, `cilia bpf lb list`) */
	__u8  flags;             /* slot 0: SVC_F_* */
	__u8  local_count;       /* slot 0: backends on this node, in slots 1..local_count */
	__u16 pad;
	__u32 affinity_timeout;  /* slot 0: seconds */
};
BPF_TABLE_PINNED("hash", struct lb_key, struct lb_service, lb_services, 65536, PIN("lb_services"));

struct lb_backend {
	__u32 address;   /* network order */
	__u16 port;      /* network order */
	__u8  proto;
	__u8  flags;
};
BPF_TABLE_PINNED("hash", __u32, struct lb_backend, lb_backends, 65536, PIN("lb_backends"));

/* The backend each connection to a frontend got (keyed by the tuple to the frontend). */
struct lb_ct_value {
	__u32 backend_id;
	__u32 rev_nat_id;
};
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct lb_ct_value, lb_ct, 131072, PIN("lb_ct"));

struct lb_affinity_key {
	__u32 client;    /* network order */
	__u32 rev_nat_id;
};
struct lb_affinity_value {
	__u64 last_used; /* bpf_ktime_get_ns */
	__u32 backend_id;
	__u32 pad;
};
BPF_TABLE_PINNED("lru_hash", struct lb_affinity_key, struct lb_affinity_value, lb_affinity, 65536, PIN("lb_affinity"));

static __always_inline int l4_csum_off(const struct pkt *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? 16 : 6);
}

static __always_inline __u64 l4_csum_flags(const struct pkt *p)
{
	return p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Rewrite the source (dst = 0) or destination address, fixing the IP and L4 checksums. */
static __always_inline int rewrite_addr(struct __sk_buff *skb, const struct pkt *p, int dst, __u32 old, __u32 new)
{
	if (bpf_l4_csum_replace(skb, l4_csum_off(p), old, new, BPF_F_PSEUDO_HDR | 4 | l4_csum_flags(p)) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, 4) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, dst ? IP_DADDR_OFF : IP_SADDR_OFF, &new, 4, 0);
}

static __always_inline int rewrite_port(struct __sk_buff *skb, const struct pkt *p, int dst, __u16 old, __u16 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, l4_csum_off(p), old, new, 2 | l4_csum_flags(p)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, p->l4_off + (dst ? 2 : 0), &new, 2, 0);
}

static __always_inline int lb_is_frontend(const struct pkt *p)
{
	return p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP;
}

/* A backend of `svc` for this connection: the one it already has (if still a backend), the
 * client's affinity, or a random one (of the local ones only, when `local_only`). 0: none. */
static __always_inline __u32 lb_select(const struct pkt *p, struct lb_key *k, struct lb_service *svc,
				       struct ct_key *ck, __u64 now, int local_only)
{
	struct lb_ct_value *known = lb_ct.lookup(ck);
	if (known && lb_backends.lookup(&known->backend_id))
		return known->backend_id;
	__u32 backend_id = 0;
	struct lb_affinity_key ak = { .client = p->saddr, .rev_nat_id = svc->rev_nat_id };
	if (svc->flags & SVC_F_AFFINITY) {
		struct lb_affinity_value *a = lb_affinity.lookup(&ak);
		if (a && now - a->last_used < (__u64)svc->affinity_timeout * 1000000000ULL &&
		    lb_backends.lookup(&a->backend_id))
			backend_id = a->backend_id;
	}
	if (!backend_id) {
		__u16 count = local_only ? svc->local_count : svc->count;
		if (!count)
			return 0;
		k->slot = (bpf_get_prandom_u32() % count) + 1;
		struct lb_service *slot = lb_services.lookup(k);
		if (!slot)
			return 0;
		backend_id = slot->backend_id;
	}
	struct lb_ct_value v = { .backend_id = backend_id, .rev_nat_id = svc->rev_nat_id };
	lb_ct.update(ck, &v);
	if (svc->flags & SVC_F_AFFINITY) {
		struct lb_affinity_value a = { .last_used = now, .backend_id = backend_id };
		lb_affinity.update(&ak, &a);
	}
	return backend_id;
}

/* DNAT a packet to a frontend to its backend. Returns 0 when the packet is not for a frontend,
 * 1 when translated (p and nat describe the result), or a drop reason. `from_outside`: only
 * external frontends count, and externalTrafficPolicy: Local is honoured. */
static __always_inline int lb_translate(struct __sk_buff *skb, struct pkt *p, struct ct_nat *nat, __u64 now,
					int from_outside)
{
	nat->flags = 0;
	if (!lb_is_frontend(p) || p->is_fragment)
		return 0;
	struct lb_key k = { .address = p->daddr, .dport = p->dport, .slot = 0, .proto = p->proto };
	struct lb_service *svc = lb_services.lookup(&k);
	if (!svc)
		return 0;
	if (from_outside && !(svc->flags & SVC_F_EXTERNAL))
		return 0;
	struct ct_key ck = {};
	ct_key_of(p, &ck, 0);
	__u32 backend_id = lb_select(p, &k, svc, &ck, now, from_outside && (svc->flags & SVC_F_LOCAL_ONLY));
	if (!backend_id)
		return DROP_NO_SERVICE;
	struct lb_backend *be = lb_backends.lookup(&backend_id);
	if (!be)
		return DROP_NO_SERVICE;
	__u32 baddr = be->address;
	__u16 bport = be->port;
	nat->addr = p->daddr;
	nat->port = p->dport;
	nat->flags = CT_NAT_SERVICE;
	if (rewrite_addr(skb, p, 1, p->daddr, baddr) < 0 || rewrite_port(skb, p, 1, p->dport, bport) < 0)
		return DROP_INVALID_PACKET;
	if (baddr == p->saddr) {
		/* Hairpin: the pod reaches itself; it would drop a packet from its own address. */
		if (rewrite_addr(skb, p, 0, p->saddr, IPV4_LOOPBACK_BE) < 0)
			return DROP_INVALID_PACKET;
		p->saddr = IPV4_LOOPBACK_BE;
		nat->flags |= CT_NAT_HAIRPIN;
	}
	p->daddr = baddr;
	p->dport = bport;
	p->policy_port = bport;
	return 1;
}

/* A reply of a connection made to a frontend: its source becomes the frontend again (and, for a
 * hairpin, its destination the pod). Returns 0, or -1 when the packet could not be rewritten. */
static __always_inline int lb_rev_nat(struct __sk_buff *skb, struct pkt *p, const struct ct_nat *nat)
{
	if (!(nat->flags & CT_NAT_SERVICE))
		return 0;
	__u32 backend = p->saddr;
	if (rewrite_addr(skb, p, 0, p->saddr, nat->addr) < 0 || rewrite_port(skb, p, 0, p->sport, nat->port) < 0)
		return -1;
	p->saddr = nat->addr;
	p->sport = nat->port;
	if (nat->flags & CT_NAT_HAIRPIN) {
		if (rewrite_addr(skb, p, 1, p->daddr, backend) < 0)
			return -1;
		p->daddr = backend;
	}
	return 0;
}

#endif
