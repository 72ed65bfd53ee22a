"""The transparent HTTP (L7) proxy of a node: Cilium's HTTP rules on mitmproxy's proxy core."""
