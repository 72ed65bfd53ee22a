"""The node's transparent DNS proxy: DNS rules, the FQDN cache, toFQDNs, Hubble DNS flows."""
