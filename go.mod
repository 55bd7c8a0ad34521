module github.com/vdrepl/vdrepl

go 1.26.8

require golang.org/x/sys v0.49.0
