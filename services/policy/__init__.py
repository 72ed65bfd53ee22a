"""The policy service: the policy repository — validate, store, revision, distribute, trace."""
