/* Policy lookup, as Cilium's bpf/lib/policy.h: the longest protocol/port match for the remote
 * identity and for identity 0 (any); a deny wins, then the higher proxy priority, then the longer
 * prefix, then the identity-specific entry. */
#ifndef CILIA_POLICY_H
#define CILIA_POLICY_H

#include "common.h"
#include "maps.h"

#define POLICY_ALLOW    0
#define POLICY_DENY     1
#define POLICY_REDIRECT 2
#define POLICY_NONE     3   /* no entry: default deny */

struct policy_result {
	__u8  verdict;
	__u8  match_type;
	__u16 proxy_port;
	__u32 cookie;
};

static __always_inline void policy_lookup(__u32 ep_id, __u32 remote_id, __u8 egress, __u8 proto,
					  __u16 dport_be, struct policy_result *res)
{
	struct policy_key key = {
		.prefixlen = POLICY_FULL_PREFIX,
		.ep_id = ep_id,
		.sec_label = remote_id,
		.egress = egress,
		.protocol = proto,
		.dport = dport_be,
	};
	struct policy_entry *l3 = policy.lookup(&key);
	struct policy_entry *l4 = 0;
	struct policy_entry *chosen = 0;
	__u8 specific = 0;

	if (l3 && l3->deny) {
		chosen = l3;
		specific = 1;
	} else {
		key.sec_label = 0;
		l4 = policy.lookup(&key);
		if (l4 && (l4->deny || !l3 || l4->proxy_priority > l3->proxy_priority ||
			   (l4->proxy_priority == l3->proxy_priority &&
			    l4->lpm_prefix_length > l3->lpm_prefix_length))) {
			chosen = l4;
		} else if (l3) {
			chosen = l3;
			specific = 1;
		}
	}
	if (!chosen) {
		res->verdict = POLICY_NONE;
		res->match_type = MATCH_NONE;
		res->proxy_port = 0;
		res->cookie = 0;
		return;
	}
	__u8 plen = chosen->lpm_prefix_length;
	if (specific)
		res->match_type = plen > 8 ? MATCH_L3_L4 : (plen > 0 ? MATCH_L3_PROTO : MATCH_L3_ONLY);
	else
		res->match_type = plen == 0 ? MATCH_ALL : (plen <= 8 ? MATCH_PROTO_ONLY : MATCH_L4_ONLY);
	res->cookie = chosen->cookie;
	res->proxy_port = chosen->proxy_port;
	if (chosen->deny)
		res->verdict = POLICY_DENY;
	else if (chosen->proxy_port)
		res->verdict = POLICY_REDIRECT;
	else
		res->verdict = POLICY_ALLOW;
}

#endif
