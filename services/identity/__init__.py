"""The identity service: label sets -> numeric security identities, cluster-wide."""
