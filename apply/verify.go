package apply

// imagesAt is the applied cycle the images of a VM in state st are at, or 0
// when they are not at one: during an initial copy or before its cycles made
// them consistent, while an apply intent is unfinished, and while the VM is
// failed over here (the images then follow the failover, not the primary).
// A resync held back keeps the images at their last consistent point, which
// is still st.Applied. `vdrepl verify` compares a range only against
// images at a cycle it names (wire.SumsCycleHeader).
func imagesAt(st replicaState) uint64 {
	if !st.Consistent || st.Intent != nil || st.Failover != nil || st.State == stateInitialCopy {
		return 0
	}
	return st.Applied
}
