"""The datapath agent: endpoints, eBPF programs and maps, ipcache, conntrack, flows — one per node."""
