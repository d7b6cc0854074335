//! Test harnesses shared by the integration tests: the local Kubernetes control plane.
