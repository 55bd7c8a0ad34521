package daemon

func (d *Daemon) serveMetrics(errc chan<- error) (func(), error) { return func() {}, nil }
