"""cilia's microservices: identity, policy, datapath, dnsproxy, l7proxy, lbipam."""
