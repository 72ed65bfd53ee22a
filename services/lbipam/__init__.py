"""The lbipam service: Services and their ClusterIPs, LB-IPAM pools and allocation, and the L2 and BGP
announcement policies; `services.lbipam.announcer` is its per-node half (ARP and BGP)."""
