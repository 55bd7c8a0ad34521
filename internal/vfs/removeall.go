package vfs

import (
	"errors"
	"io/fs"
	"path/filepath"
)

// RemoveAll removes name and everything under it, as os.RemoveAll does,
// through fsys. A missing name is not an error. The removal is durable
// only after SyncDir on name's parent.
func RemoveAll(fsys FS, name string) error {
	st, err := fsys.Stat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if st.IsDir() {
		names, err := fsys.ReadDir(name)
		if err != nil {
			return err
		}
		for _, n := range names {
			if err := RemoveAll(fsys, filepath.Join(name, n)); err != nil {
				return err
			}
		}
	}
	if err := fsys.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
