/* Connection tracking: an entry per connection, keyed by its first packet's tuple. Replies (and
 * only replies) of a known connection pass without a policy lookup. Entries age out by state. */
#ifndef CILIA_CONNTRACK_H
#define CILIA_CONNTRACK_H

#include "common.h"
#include "maps.h"

#define NSEC 1000000000ULL
#define CT_TIMEOUT_SYN         (60ULL * NSEC)      /* TCP, no reply yet */
#define CT_TIMEOUT_ESTABLISHED (21600ULL * NSEC)   /* TCP, both directions seen */
#define CT_TIMEOUT_CLOSING     (10ULL * NSEC)      /* TCP, FIN or RST seen */
#define CT_TIMEOUT_OTHER       (60ULL * NSEC)      /* UDP, ICMP, SCTP */

#define CT_NEW      0
#define CT_ORIGINAL 1
#define CT_REPLY    2

static __always_inline __u64 ct_timeout(const struct ct_entry *e, __u8 proto)
{
	if (proto != IPPROTO_TCP)
		return CT_TIMEOUT_OTHER;
	if (e->flags & CT_F_CLOSING)
		return CT_TIMEOUT_CLOSING;
	if (e->flags & CT_F_REPLY_SEEN)
		return CT_TIMEOUT_ESTABLISHED;
	return CT_TIMEOUT_SYN;
}

static __always_inline void ct_key_of(const struct pkt *p, struct ct_key *k, int reverse)
{
	if (reverse) {
		k->saddr = p->daddr;
		k->daddr = p->saddr;
		k->sport = p->dport;
		k->dport = p->sport;
	} else {
		k->saddr = p->saddr;
		k->daddr = p->daddr;
		k->sport = p->sport;
		k->dport = p->dport;
	}
	k->proto = p->proto;
}

/* Refresh an entry's age at most once a second: both directions of a busy connection run on
 * different CPUs, and writing the shared entry on every packet would bounce its cache line. */
#define CT_TOUCH_INTERVAL NSEC
static __always_inline void touch(struct ct_entry *e, __u64 now)
{
	if (now - e->last_seen > CT_TOUCH_INTERVAL)
		e->last_seen = now;
}

static __always_inline __u32 current_policy_rev(void)
{
	__u32 zero = 0;
	__u32 *rev = policy_rev.lookup(&zero);
	return rev ? *rev : 0;
}

/* What a connection through a service frontend remembers, so that replies get the frontend back. */
#define CT_NAT_SERVICE 0x1   /* replies: source <- the frontend */
#define CT_NAT_HAIRPIN 0x2   /* a pod reaching itself: replies also get destination <- the pod */
struct ct_nat {
	__u32 addr;   /* frontend address, network order */
	__u16 port;   /* frontend port, network order */
	__u8  flags;
	__u8  pad;
};

/* Look the packet up; on a hit, refresh the entry and report whether its TCP flags are new for its
 * direction (monitor aggregation: trace events only on connection setup and flag changes), and
 * whether an original-direction packet may reuse the verdict cached at the current revision. `want`:
 * the frontend the original-direction packet was translated from (flags 0: none); `nat`: on a
 * reply, the frontend its connection was made to. */
static __always_inline int ct_lookup(const struct pkt *p, __u64 now, __u8 *new_flags, __u8 *cached,
				     struct ct_nat *nat, const struct ct_nat *want)
{
	struct ct_key k = {};
	struct ct_entry *e;

	*new_flags = 0;
	*cached = 0;
	nat->flags = 0;
	ct_key_of(p, &k, 0);
	e = ct.lookup(&k);
	if (e) {
		if (now - e->last_seen > ct_timeout(e, p->proto) || e->nat_flags != want->flags ||
		    (want->flags && (e->nat_addr != want->addr || e->nat_port != want->port))) {
			/* Expired, or the tuple now belongs to a connection made another way (through a
			 * service frontend, or no longer): a new connection, whose replies must be
			 * translated as it was. */
			ct.delete(&k);
			return CT_NEW;
		}
		touch(e, now);
		if ((p->tcp_flags & (TCP_FLAG_FIN_ | TCP_FLAG_RST_)) && !(e->flags & CT_F_CLOSING))
			e->flags |= CT_F_CLOSING;
		if ((p->tcp_flags | e->tcp_flags_seen) != e->tcp_flags_seen) {
			*new_flags = 1;
			e->tcp_flags_seen |= p->tcp_flags;
		}
		if ((e->flags & CT_F_VERDICT_CACHED) && e->policy_rev == current_policy_rev())
			*cached = 1;
		return CT_ORIGINAL;
	}
	ct_key_of(p, &k, 1);
	e = ct.lookup(&k);
	if (e) {
		if (now - e->last_seen > ct_timeout(e, p->proto)) {
			ct.delete(&k);
			return CT_NEW;
		}
		touch(e, now);
		if (!(e->flags & CT_F_REPLY_SEEN))
			e->flags |= CT_F_REPLY_SEEN;
		if ((p->tcp_flags & (TCP_FLAG_FIN_ | TCP_FLAG_RST_)) && !(e->flags & CT_F_CLOSING))
			e->flags |= CT_F_CLOSING;
		if ((p->tcp_flags | e->tcp_flags_seen_reply) != e->tcp_flags_seen_reply) {
			*new_flags = 1;
			e->tcp_flags_seen_reply |= p->tcp_flags;
		}
		nat->flags = e->nat_flags;
		nat->addr = e->nat_addr;
		nat->port = e->nat_port;
		return CT_REPLY;
	}
	return CT_NEW;
}

/* The identity conntrack recorded for the peer that sent this packet: the source of an original-
 * direction packet, the destination (the responder) for a reply. 0: no entry. */
static __always_inline __u32 ct_peer_identity(const struct pkt *p, int state)
{
	struct ct_key k = {};
	ct_key_of(p, &k, state == CT_REPLY);
	struct ct_entry *e = ct.lookup(&k);
	if (!e)
		return 0;
	return state == CT_REPLY ? e->dst_identity : e->src_identity;
}

/* Remember that this original-direction packet was allowed at the current policy revision. */
static __always_inline void ct_cache_verdict(const struct pkt *p)
{
	struct ct_key k = {};
	ct_key_of(p, &k, 0);
	struct ct_entry *e = ct.lookup(&k);
	if (e) {
		e->flags |= CT_F_VERDICT_CACHED;
		e->policy_rev = current_policy_rev();
	}
}

static __always_inline void ct_create(const struct pkt *p, __u64 now, __u32 src_identity, __u32 dst_identity,
				      __u32 src_ep, __u32 dst_ep, __u32 cookie, __u16 proxy_port,
				      const struct ct_nat *nat)
{
	struct ct_key k = {};
	struct ct_entry e = {};

	ct_key_of(p, &k, 0);
	e.created = now;
	e.last_seen = now;
	e.packets = 1;
	e.bytes = p->len;
	e.src_identity = src_identity;
	e.dst_identity = dst_identity;
	e.src_ep = src_ep;
	e.dst_ep = dst_ep;
	e.cookie = cookie;
	e.proxy_port = proxy_port;
	e.tcp_flags_seen = p->tcp_flags;
	if (proxy_port)
		e.flags |= CT_F_PROXIED;
	else
		e.flags |= CT_F_VERDICT_CACHED;
	e.policy_rev = current_policy_rev();
	e.nat_flags = nat->flags;
	e.nat_addr = nat->addr;
	e.nat_port = nat->port;
	if (p->tcp_flags & (TCP_FLAG_FIN_ | TCP_FLAG_RST_))
		e.flags |= CT_F_CLOSING;
	ct.update(&k, &e);
}

#endif
