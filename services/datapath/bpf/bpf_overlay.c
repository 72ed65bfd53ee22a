/* cilia's overlay programs, attached with TC (clsact) to the node's VXLAN device, cilia_vxlan
 * (external / collect-metadata mode, so one device reaches every node):
 *   to_overlay   (TC egress): encapsulate for the node that owns the destination (the ipcache's
 *                tunnel endpoint), carrying the source's security identity in the VNI, as Cilium does.
 *   from_overlay (TC ingress): the VNI names the source identity; the destination endpoint's ingress
 *                policy judges it with that identity, never with the inner source address alone.
 * Included by cilia.c after bpf_lxc.c (one compile for every program of the node). */

/* The identity a packet leaving through the tunnel carries: its proxy's mark (the client the
 * proxy speaks for), else the local endpoint's identity, the node's own (host) or world. */
static __always_inline __u32 overlay_source_identity(const struct pkt *p, __u32 mark)
{
	if ((mark & MARK_MAGIC_MASK) == MARK_FROM_PROXY)
		return mark >> 12;
	return remote_identity(p->saddr);
}

/* Traffic arriving at the node for a local endpoint, from a source whose identity the caller
 * established (the VNI, or the ipcache for outside traffic): the endpoint's ingress policy with
 * conntrack, then marked as judged for to_container. `nat`: the frontend, when the caller
 * translated a service address. `from`: the trace point of a new connection's first hop. */
static __always_inline int ingress_to_endpoint(struct __sk_buff *skb, struct pkt *p, struct ctx_info *c,
					       struct endpoint_info *dst, __u64 now, const struct ct_nat *nat,
					       __u8 from)
{
	__u32 src_identity = c->src_identity;
	c->dst_ep = dst->ep_id;
	c->dst_identity = dst->identity;
	if (p->is_fragment)
		return drop(p, c, DROP_FRAG_NOT_SUPPORTED, 0);

	__u8 new_flags = 0, cached = 0;
	struct ct_nat rnat = {};
	int state = ct_lookup(p, now, &new_flags, &cached, &rnat, nat);
	if (state != CT_NEW && ct_peer_identity(p, state) != src_identity) {
		/* The tuple's connection was made by another identity: this packet gets no free pass. */
		state = CT_ORIGINAL;
		cached = 0;
	}
	if (state == CT_REPLY && lb_rev_nat(skb, p, &rnat) < 0)
		return drop(p, c, DROP_INVALID_PACKET, 0);   /* a remote backend's reply to a service client */
	if (state == CT_REPLY || cached) {
		count(0, DIR_INGRESS, p->len);
		if (new_flags) {
			c->ifindex = dst->ifindex;
			emit(p, c, EVENT_TRACE, TRACE_TO_LXC, VERDICT_FORWARDED, MATCH_NONE, state == CT_REPLY, 0, 0);
		}
		skb->mark = MARK_JUDGED;
		return TC_ACT_OK;
	}

	struct policy_result in = { .verdict = POLICY_ALLOW, .match_type = MATCH_ALL };
	if (dst->flags & EP_F_INGRESS_ENFORCED)
		policy_lookup(dst->ep_id, src_identity, 0, p->proto, p->policy_port, &in);
	if (in.verdict == POLICY_DENY || in.verdict == POLICY_NONE)
		return policy_denied(p, c, DIR_INGRESS, &in);
	if (in.verdict == POLICY_REDIRECT)
		return to_proxy(skb, p, c, DIR_INGRESS, &in, state == CT_NEW, now, nat);   /* on into the stack */

	if (state == CT_NEW) {
		ct_create(p, now, src_identity, c->dst_identity, 0, c->dst_ep, in.cookie, 0, nat);
		emit(p, c, EVENT_TRACE, from, VERDICT_FORWARDED, MATCH_NONE, 0, in.cookie, 0);
		c->ifindex = dst->ifindex;
		if (dst->flags & EP_F_INGRESS_ENFORCED)
			emit(p, c, EVENT_POLICY_VERDICT, 0, VERDICT_FORWARDED, in.match_type, 0, in.cookie, 0);
		emit(p, c, EVENT_TRACE, TRACE_TO_LXC, VERDICT_FORWARDED, MATCH_NONE, 0, in.cookie, 0);
	} else {
		ct_cache_verdict(p);
		c->ifindex = dst->ifindex;
		if (new_flags)
			emit(p, c, EVENT_TRACE, TRACE_TO_LXC, VERDICT_FORWARDED, MATCH_NONE, 0, 0, 0);
	}
	count(0, DIR_INGRESS, p->len);
	skb->mark = MARK_JUDGED;
	return TC_ACT_OK;
}

int to_overlay(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct ctx_info c = { .ifindex = skb->ifindex, .direction = DIR_EGRESS };
	int other = 0;

	int reason = parse_pulled(skb, &p, &other);
	if (reason)
		return drop(&p, &c, reason, 0);
	if (other)
		return TC_ACT_SHOT;   /* the tunnel device is NOARP: nothing to resolve across it */
	c.src_identity = overlay_source_identity(&p, skb->mark);

	struct ipcache_key key = { .prefixlen = 32, .addr = p.daddr };
	struct ipcache_value *v = ipcache.lookup(&key);
	c.dst_identity = v ? v->identity : IDENTITY_WORLD;
	if (!v || !v->tunnel_endpoint)
		return drop(&p, &c, DROP_NO_TUNNEL_ENDPOINT, 0);

	struct bpf_tunnel_key tk = {};
	tk.remote_ipv4 = bpf_ntohl(v->tunnel_endpoint);
	tk.tunnel_id = c.src_identity;
	tk.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &tk, sizeof(tk), BPF_F_ZERO_CSUM_TX) < 0)
		return drop(&p, &c, DROP_NO_TUNNEL_ENDPOINT, 0);
	skb->mark = 0;   /* the outer packet is routed like any other of the node */
	return TC_ACT_OK;
}

int from_overlay(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct ctx_info c = { .ifindex = skb->ifindex, .direction = DIR_INGRESS };
	struct bpf_tunnel_key tk = {};
	int other = 0;

	int reason = parse_pulled(skb, &p, &other);
	if (reason)
		return drop(&p, &c, reason, 0);
	if (other)
		return TC_ACT_OK;
	if (bpf_skb_get_tunnel_key(skb, &tk, sizeof(tk), 0) < 0)
		return drop(&p, &c, DROP_NO_TUNNEL_ENDPOINT, 0);
	__u32 src_identity = (__u32)tk.tunnel_id;
	if (src_identity == IDENTITY_HOST)
		src_identity = IDENTITY_REMOTE_NODE;   /* another node's host is a remote node here */
	c.src_identity = src_identity;
	/* The inner frame is addressed to the sender's tunnel device: hand it to this node's stack. */
	bpf_skb_change_type(skb, 0 /* PACKET_HOST */);

	struct endpoint_info *dst = endpoints.lookup(&p.daddr);
	if (!dst) {
		c.dst_identity = remote_identity(p.daddr);
		return TC_ACT_OK;   /* for the node itself */
	}
	struct ct_nat nat = {};
	return ingress_to_endpoint(skb, &p, &c, dst, bpf_ktime_get_ns(), &nat, TRACE_FROM_OVERLAY);
}
