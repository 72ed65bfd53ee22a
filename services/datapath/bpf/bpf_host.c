/* cilia's program on the node's uplink device(s), at TC ingress: traffic from outside the cluster
 * to a LoadBalancer or external IP (answered by the node's L2 or BGP announcer) is load-balanced
 * here. A backend on this node gets the packet DNATed and judged by its ingress policy at once; a
 * backend on another node gets it SNATed to this node's address as well (so that its reply comes
 * back here to be reverse-translated) and sent through the tunnel with the client's identity
 * (`world`, usually) in the VNI, so the backend's policy still sees where the packet came from.
 * Everything else on the uplink (the node's own traffic, the tunnel) passes untouched.
 * Included by cilia.c after bpf_overlay.c. */

#define NAT_PORT_MIN   61000   /* above Linux's ephemeral range (32768-60999) */
#define NAT_PORT_RANGE 4096
#define NAT_TRIES      4

/* A connection SNATed for a remote backend, found again from its reply (backend -> node:port). */
struct snat_key {
	__u32 backend;   /* network order */
	__u32 node;
	__u16 bport;     /* network order */
	__u16 nport;
	__u8  proto;
	__u8  pad[3];
};
struct snat_value {
	__u32 client;    /* network order */
	__u32 frontend;
	__u16 cport;     /* network order */
	__u16 fport;
	__u32 pad;
};
BPF_TABLE_PINNED("lru_hash", struct snat_key, struct snat_value, lb_snat, 65536, PIN("lb_snat"));
/* The NAT port of each such connection, by its tuple to the frontend. */
BPF_TABLE_PINNED("lru_hash", struct ct_key, __u16, lb_snat_port, 65536, PIN("lb_snat_port"));

/* The reply of an SNATed connection: back to the client, from the frontend. */
static __always_inline int snat_reply(struct __sk_buff *skb, struct pkt *p)
{
	struct snat_key k = { .backend = p->saddr, .node = p->daddr, .bport = p->sport, .nport = p->dport,
			      .proto = p->proto };
	struct snat_value *found = lb_snat.lookup(&k);
	if (!found)
		return TC_ACT_OK;   /* the node's own traffic */
	struct snat_value v = *found;
	if (rewrite_addr(skb, p, 0, p->saddr, v.frontend) < 0 || rewrite_port(skb, p, 0, p->sport, v.fport) < 0 ||
	    rewrite_addr(skb, p, 1, p->daddr, v.client) < 0 || rewrite_port(skb, p, 1, p->dport, v.cport) < 0)
		return TC_ACT_SHOT;
	count(0, DIR_EGRESS, p->len);
	return TC_ACT_OK;   /* the stack forwards it to the client */
}

int from_netdev(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct ctx_info c = { .ifindex = skb->ifindex, .direction = DIR_INGRESS };
	int other = 0;

	if (parse_pulled(skb, &p, &other) || other || !lb_is_frontend(&p) || p.is_fragment)
		return TC_ACT_OK;   /* not a service's: the node's stack decides */
	__u32 idx = CONFIG_NODE_IP;
	__u32 *cfg = config.lookup(&idx);
	__u32 node_ip = cfg ? *cfg : 0;
	if (node_ip && p.daddr == node_ip)
		return snat_reply(skb, &p);

	struct pkt orig = p;
	struct ct_nat nat = {};
	__u64 now = bpf_ktime_get_ns();
	c.src_identity = remote_identity(p.saddr);
	int lb = lb_translate(skb, &p, &nat, now, 1);
	if (lb == 0)
		return TC_ACT_OK;
	if (lb > 1)
		return drop(&p, &c, lb, 0);

	struct endpoint_info *dst = endpoints.lookup(&p.daddr);
	if (dst)
		return ingress_to_endpoint(skb, &p, &c, dst, now, &nat, TRACE_FROM_NETWORK);

	/* A backend on another node: SNAT to this node, one NAT port per connection. */
	if (!node_ip)
		return drop(&p, &c, DROP_NO_SERVICE, 0);
	struct ct_key ok = {};
	ct_key_of(&orig, &ok, 0);
	struct snat_key sk = { .backend = p.daddr, .node = node_ip, .bport = p.dport, .proto = p.proto };
	struct snat_value sv = { .client = orig.saddr, .frontend = orig.daddr, .cport = orig.sport, .fport = orig.dport };
	__u16 *known = lb_snat_port.lookup(&ok);
	if (known) {
		sk.nport = *known;
		lb_snat.update(&sk, &sv);
	} else {
		int placed = 0;
		#pragma unroll
		for (int i = 0; i < NAT_TRIES; i++) {
			__u16 port = NAT_PORT_MIN + (bpf_get_prandom_u32() % NAT_PORT_RANGE);
			sk.nport = bpf_htons(port);
			if (lb_snat.insert(&sk, &sv) == 0) {
				placed = 1;
				break;
			}
		}
		if (!placed)
			return drop(&p, &c, DROP_NO_SERVICE, 0);
		lb_snat_port.update(&ok, &sk.nport);
	}
	if (rewrite_addr(skb, &p, 0, p.saddr, node_ip) < 0 || rewrite_port(skb, &p, 0, p.sport, sk.nport) < 0)
		return drop(&p, &c, DROP_INVALID_PACKET, 0);
	/* to_overlay puts the client's identity, not the node's, in the VNI. Straight to the tunnel:
	 * the stack would refuse to forward a packet that now comes from one of its own addresses. */
	skb->mark = MARK_FROM_PROXY | (c.src_identity << 12);
	count(0, DIR_INGRESS, p.len);
	idx = CONFIG_OVERLAY_IFINDEX;
	__u32 *overlay = config.lookup(&idx);
	if (overlay && *overlay)
		return bpf_redirect(*overlay, 0);
	return TC_ACT_OK;
}
