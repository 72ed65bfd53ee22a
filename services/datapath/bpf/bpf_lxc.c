/* cilia's endpoint programs, attached with TC (clsact) to each endpoint's host-side veth:
 *   from_container (TC ingress): the source endpoint's egress policy and, for a local
 *                  destination, the destination's ingress policy; proxy redirects.
 *   to_container   (TC egress): the destination's ingress policy for traffic from the host,
 *                  other nodes or the outside (unless from_container already judged it).
 * Every original-direction packet is checked, so revoking an allow cuts a flow; replies of a
 * tracked connection pass on conntrack alone. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/events.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/lb.h"

#define PULL_LEN 134   /* Ethernet + largest IPv4 header + largest TCP header */

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p, int *other)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	*other = 0;
	p->len = skb->len;
	if ((void *)(eth + 1) > data_end)
		return DROP_INVALID_PACKET;
	if (eth->h_proto == ETH_P_ARP_BE) {
		*other = 1;
		return 0;
	}
	if (eth->h_proto == ETH_P_IPV6_BE) {
		/* IPv4-only datapath: pass neighbour discovery, drop the rest. */
		__u8 *nexthdr = (__u8 *)(eth + 1) + 6;
		__u8 *icmp6_type = (__u8 *)(eth + 1) + 40;
		if ((void *)(icmp6_type + 1) > data_end)
			return DROP_INVALID_PACKET;
		if (*nexthdr == IPPROTO_ICMPV6_ && *icmp6_type >= 133 && *icmp6_type <= 137) {
			*other = 1;
			return 0;
		}
		return DROP_UNSUPPORTED_L3;
	}
	if (eth->h_proto != ETH_P_IP_BE)
		return DROP_UNSUPPORTED_L3;

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return DROP_INVALID_PACKET;
	if (ip->version != 4 || ip->ihl < 5)
		return DROP_INVALID_PACKET;
	__u32 ihl = (ip->ihl & 0xF) * 4;
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl || tot_len + ETH_HLEN > skb->len)
		return DROP_INVALID_PACKET;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	if (bpf_ntohs(ip->frag_off) & 0x1FFF) {
		p->is_fragment = 1;
		return 0;
	}
	void *l4 = (void *)ip + ihl;
	p->l4_off = ETH_HLEN + ihl;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return DROP_CT_INVALID_HDR;
		if (th->doff < 5)
			return DROP_INVALID_PACKET;
		p->sport = th->source;
		p->dport = th->dest;
		p->policy_port = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
	} else if (ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_SCTP) {
		__u16 *ports = l4;
		if ((void *)(ports + 2) > data_end)
			return DROP_CT_INVALID_HDR;
		if (ip->protocol == IPPROTO_UDP && (void *)l4 + sizeof(struct udphdr) > data_end)
			return DROP_CT_INVALID_HDR;
		p->sport = ports[0];
		p->dport = ports[1];
		p->policy_port = ports[1];
	} else if (ip->protocol == IPPROTO_ICMP) {
		struct icmphdr *ih = l4;
		if ((void *)(ih + 1) > data_end)
			return DROP_CT_INVALID_HDR;
		p->icmp_type = ih->type;
		p->icmp_code = ih->code;
		p->policy_port = bpf_htons((__u16)ih->type);
		if (ih->type == ICMP_ECHO)
			p->sport = ih->un.echo.id;
		else if (ih->type == ICMP_ECHOREPLY)
			p->dport = ih->un.echo.id;
	}
	return 0;
}

/* Parse; only when the headers are not all in the linear data (rare: they normally are) pull them
 * in and parse again, so the common path never copies or reallocates. */
static __always_inline int parse_pulled(struct __sk_buff *skb, struct pkt *p, int *other)
{
	int reason = parse(skb, p, other);
	if (reason != DROP_INVALID_PACKET && reason != DROP_CT_INVALID_HDR)
		return reason;
	__u32 linear = skb->data_end - skb->data;
	if (linear >= PULL_LEN || skb->len <= linear)
		return reason;
	if (bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN))
		return reason;
	__builtin_memset(p, 0, sizeof(*p));
	return parse(skb, p, other);
}

static __always_inline int drop(const struct pkt *p, const struct ctx_info *c, __u8 reason, __u32 cookie)
{
	count(reason, c->direction, p->len);
	emit(p, c, EVENT_DROP, reason, VERDICT_DROPPED, MATCH_NONE, 2, cookie, 0);
	return TC_ACT_SHOT;
}

static __always_inline int policy_denied(const struct pkt *p, struct ctx_info *c, __u8 dir,
					 const struct policy_result *r)
{
	__u8 saved = c->direction;
	__u8 reason = r->verdict == POLICY_DENY ? DROP_POLICY_DENY : DROP_POLICY;
	c->direction = dir;
	emit(p, c, EVENT_POLICY_VERDICT, reason, VERDICT_DROPPED, r->match_type, 2, r->cookie, 0);
	int ret = drop(p, c, reason, r->cookie);
	c->direction = saved;
	return ret;
}

static __always_inline __u32 remote_identity(__u32 addr)
{
	struct endpoint_info *ep = endpoints.lookup(&addr);
	if (ep)
		return ep->identity;
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct ipcache_value *v = ipcache.lookup(&key);
	return v ? v->identity : IDENTITY_WORLD;
}

/* A destination that is not a local endpoint: its identity, and whether it lives behind the
 * overlay (an endpoint of another node), in which case the trace point is to-overlay, observed
 * on the node's tunnel device, as Hubble shows it. */
static __always_inline __u8 remote_destination(__u32 addr, struct ctx_info *c)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct ipcache_value *v = ipcache.lookup(&key);
	c->dst_identity = v ? v->identity : IDENTITY_WORLD;
	if (!v || !v->tunnel_endpoint)
		return TRACE_TO_STACK;
	__u32 idx = CONFIG_OVERLAY_IFINDEX;
	__u32 *ifindex = config.lookup(&idx);
	if (ifindex && *ifindex)
		c->ifindex = *ifindex;
	return TRACE_TO_OVERLAY;
}

/* Steer to the node's proxy: a mark that the node's nft rules turn into tproxy/redirect to
 * `port`. Fails closed when no proxy registered the port. */
static __always_inline int to_proxy(struct __sk_buff *skb, const struct pkt *p, struct ctx_info *c,
				    __u8 dir, const struct policy_result *r, int is_new, __u64 now,
				    const struct ct_nat *nat)
{
	__u16 port = r->proxy_port;
	__u8 *bound = proxy_ports.lookup(&port);
	__u8 saved = c->direction;

	c->direction = dir;
	if (!bound) {
		int ret = drop(p, c, DROP_PROXY_NOT_BOUND, r->cookie);
		c->direction = saved;
		return ret;
	}
	if (is_new) {
		ct_create(p, now, c->src_identity, c->dst_identity, c->src_ep, c->dst_ep, r->cookie, port, nat);
		emit(p, c, EVENT_POLICY_VERDICT, 0, VERDICT_REDIRECTED, r->match_type, 0, r->cookie, port);
		emit(p, c, EVENT_TRACE, TRACE_TO_PROXY, VERDICT_REDIRECTED, MATCH_NONE, 0, r->cookie, port);
	}
	count(0, dir, p->len);
	skb->mark = MARK_TO_PROXY | ((__u32)port << 16);
	c->direction = saved;
	return TC_ACT_OK;
}

int from_container(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct ctx_info c = { .ifindex = skb->ifindex, .direction = DIR_EGRESS };
	int other = 0;

	int reason = parse_pulled(skb, &p, &other);
	if (reason)
		return drop(&p, &c, reason, 0);
	if (other)
		return TC_ACT_OK;
	if ((skb->mark & MARK_MAGIC_MASK) == MARK_TO_PROXY)
		return TC_ACT_OK;   /* hairpinned by to_container on its way to the proxy */

	struct endpoint_info *src = endpoints.lookup(&p.saddr);
	if (!src || src->ifindex != skb->ifindex)
		return drop(&p, &c, DROP_INVALID_SOURCE_IP, 0);
	c.src_ep = src->ep_id;
	c.src_identity = src->identity;
	if (p.is_fragment)
		return drop(&p, &c, DROP_FRAG_NOT_SUPPORTED, 0);

	__u64 now = bpf_ktime_get_ns();
	struct ct_nat nat = {}, rnat = {};
	int lb = lb_translate(skb, &p, &nat, now, 0);
	if (lb > 1)
		return drop(&p, &c, lb, 0);
	__u8 new_flags = 0, cached = 0;
	int state = ct_lookup(&p, now, &new_flags, &cached, &rnat, &nat);
	struct endpoint_info *dst;
	if (state == CT_REPLY && rnat.flags) {
		/* A reply of a connection to a service: its source is the frontend again. */
		if (lb_rev_nat(skb, &p, &rnat) < 0)
			return drop(&p, &c, DROP_INVALID_PACKET, 0);
		if (rnat.flags & CT_NAT_HAIRPIN) {
			/* Back into the pod it came from, as if from its gateway. */
			count(0, DIR_EGRESS, p.len);
			void *data = (void *)(long)skb->data;
			void *data_end = (void *)(long)skb->data_end;
			struct ethhdr *eth = data;
			if ((void *)(eth + 1) > data_end)
				return TC_ACT_SHOT;
			__u8 mac[ETH_ALEN];
			__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
			__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
			__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
			skb->mark = MARK_JUDGED;
			return bpf_redirect(skb->ifindex, 0);
		}
	}
	if (state == CT_REPLY || cached) {
		/* Replies pass on conntrack; an original-direction packet reuses the verdict its
		 * connection got at the current policy revision (any map change invalidates it).
		 * The destination is looked up only for the (rare) trace event. */
		count(0, DIR_EGRESS, p.len);
		if (new_flags) {
			__u8 at = TRACE_TO_LXC;
			dst = endpoints.lookup(&p.daddr);
			if (dst) {
				c.dst_ep = dst->ep_id;
				c.dst_identity = dst->identity;
			} else {
				at = remote_destination(p.daddr, &c);
			}
			emit(&p, &c, EVENT_TRACE, at, VERDICT_FORWARDED, MATCH_NONE, state == CT_REPLY, 0, 0);
		}
		skb->mark = MARK_JUDGED;
		return TC_ACT_OK;
	}
	__u8 point = TRACE_TO_LXC;
	__u32 veth = c.ifindex;
	dst = endpoints.lookup(&p.daddr);
	if (dst) {
		c.dst_ep = dst->ep_id;
		c.dst_identity = dst->identity;
	} else {
		point = remote_destination(p.daddr, &c);
	}
	__u32 trace_ifindex = c.ifindex;
	c.ifindex = veth;   /* verdicts and drops are observed on the endpoint's device */

	struct policy_result eg = { .verdict = POLICY_ALLOW, .match_type = MATCH_ALL };
	if (src->flags & EP_F_EGRESS_ENFORCED)
		policy_lookup(src->ep_id, c.dst_identity, 1, p.proto, p.policy_port, &eg);
	if (eg.verdict == POLICY_DENY || eg.verdict == POLICY_NONE)
		return policy_denied(&p, &c, DIR_EGRESS, &eg);
	if (eg.verdict == POLICY_REDIRECT)
		return to_proxy(skb, &p, &c, DIR_EGRESS, &eg, state == CT_NEW, now, &nat);

	struct policy_result in = { .verdict = POLICY_ALLOW, .match_type = MATCH_ALL };
	if (dst && (dst->flags & EP_F_INGRESS_ENFORCED)) {
		policy_lookup(dst->ep_id, src->identity, 0, p.proto, p.policy_port, &in);
		if (in.verdict == POLICY_DENY || in.verdict == POLICY_NONE)
			return policy_denied(&p, &c, DIR_INGRESS, &in);
		if (in.verdict == POLICY_REDIRECT)
			return to_proxy(skb, &p, &c, DIR_INGRESS, &in, state == CT_NEW, now, &nat);
	}

	if (state == CT_NEW) {
		__u32 cookie = (dst && (dst->flags & EP_F_INGRESS_ENFORCED)) ? in.cookie : eg.cookie;
		ct_create(&p, now, c.src_identity, c.dst_identity, c.src_ep, c.dst_ep, cookie, 0, &nat);
		if (src->flags & EP_F_EGRESS_ENFORCED)
			emit(&p, &c, EVENT_POLICY_VERDICT, 0, VERDICT_FORWARDED, eg.match_type, 0, eg.cookie, 0);
		if (dst && (dst->flags & EP_F_INGRESS_ENFORCED)) {
			c.direction = DIR_INGRESS;
			emit(&p, &c, EVENT_POLICY_VERDICT, 0, VERDICT_FORWARDED, in.match_type, 0, in.cookie, 0);
			c.direction = DIR_EGRESS;
		}
		c.ifindex = trace_ifindex;
		emit(&p, &c, EVENT_TRACE, point, VERDICT_FORWARDED, MATCH_NONE, 0, cookie, 0);
	} else {
		ct_cache_verdict(&p);
		c.ifindex = trace_ifindex;
		if (new_flags)
			emit(&p, &c, EVENT_TRACE, point, VERDICT_FORWARDED, MATCH_NONE, 0, 0, 0);
	}
	count(0, DIR_EGRESS, p.len);
	skb->mark = MARK_JUDGED;
	return TC_ACT_OK;
}

int to_container(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct ctx_info c = { .ifindex = skb->ifindex, .direction = DIR_INGRESS };
	int other = 0;
	__u32 mark = skb->mark;

	if ((mark & MARK_MAGIC_MASK) == MARK_JUDGED) {
		skb->mark = 0;
		return TC_ACT_OK;   /* from_container of a local endpoint judged it already */
	}
	int reason = parse_pulled(skb, &p, &other);
	if (reason)
		return drop(&p, &c, reason, 0);
	if (other)
		return TC_ACT_OK;

	struct endpoint_info *dst = endpoints.lookup(&p.daddr);
	if (!dst || dst->ifindex != skb->ifindex)
		return TC_ACT_OK;   /* not addressed to this endpoint (e.g. broadcast) */
	c.dst_ep = dst->ep_id;
	c.dst_identity = dst->identity;
	__u8 from_proxy = (mark & MARK_MAGIC_MASK) == MARK_FROM_PROXY;
	if (p.is_fragment)
		return drop(&p, &c, DROP_FRAG_NOT_SUPPORTED, 0);

	__u64 now = bpf_ktime_get_ns();
	__u8 new_flags = 0, cached = 0;
	struct ct_nat nat = {}, rnat = {};
	int state = ct_lookup(&p, now, &new_flags, &cached, &rnat, &nat);
	if (state == CT_REPLY && lb_rev_nat(skb, &p, &rnat) < 0)
		return drop(&p, &c, DROP_INVALID_PACKET, 0);   /* e.g. a proxy's answer for a service */
	if (from_proxy) {
		c.src_identity = mark >> 12;   /* trusted: only privileged processes of the node set marks */
	} else if (state != CT_REPLY && !cached) {
		struct endpoint_info *src = endpoints.lookup(&p.saddr);
		if (src)
			c.src_ep = src->ep_id;
		c.src_identity = remote_identity(p.saddr);
	}
	if (state == CT_REPLY || (cached && !from_proxy)) {
		count(0, DIR_INGRESS, p.len);
		if (new_flags) {
			if (!from_proxy)
				c.src_identity = remote_identity(p.saddr);
			emit(&p, &c, EVENT_TRACE, TRACE_TO_LXC, VERDICT_FORWARDED, MATCH_NONE, state == CT_REPLY, 0, 0);
		}
		skb->mark = 0;
		return TC_ACT_OK;
	}

	struct policy_result in = { .verdict = POLICY_ALLOW, .match_type = MATCH_ALL };
	if (dst->flags & EP_F_INGRESS_ENFORCED)
		policy_lookup(dst->ep_id, c.src_identity, 0, p.proto, p.policy_port, &in);
	if (in.verdict == POLICY_DENY || in.verdict == POLICY_NONE)
		return policy_denied(&p, &c, DIR_INGRESS, &in);
	if (in.verdict == POLICY_REDIRECT && !(from_proxy && (mark & MARK_PROXY_INGRESS_DONE))) {
		int ret = to_proxy(skb, &p, &c, DIR_INGRESS, &in, state == CT_NEW, now, &nat);
		if (ret != TC_ACT_OK)
			return ret;
		/* Hairpin: back in through this device's ingress, addressed to the node, into the
		 * node's stack where the proxy's nft rule takes it. */
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		struct ethhdr *eth = data;
		if ((void *)(eth + 1) > data_end)
			return TC_ACT_SHOT;
		__builtin_memcpy(eth->h_dest, dst->host_mac, ETH_ALEN);
		return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
	}

	if (state == CT_NEW) {
		ct_create(&p, now, c.src_identity, c.dst_identity, c.src_ep, c.dst_ep, in.cookie, 0, &nat);
		if (dst->flags & EP_F_INGRESS_ENFORCED)
			emit(&p, &c, EVENT_POLICY_VERDICT, 0, VERDICT_FORWARDED, in.match_type, 0, in.cookie, 0);
		emit(&p, &c, EVENT_TRACE, TRACE_TO_LXC, VERDICT_FORWARDED, MATCH_NONE, 0, in.cookie, 0);
	} else {
		if (!from_proxy)
			ct_cache_verdict(&p);
		if (new_flags)
			emit(&p, &c, EVENT_TRACE, TRACE_TO_LXC, VERDICT_FORWARDED, MATCH_NONE, 0, 0, 0);
	}
	count(0, DIR_INGRESS, p.len);
	skb->mark = 0;
	return TC_ACT_OK;
}
