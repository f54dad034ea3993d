//! Where one store's directory lies against another's: a store, a copy's
//! target or an export written among another store's own entries (its
//! marker, `runs/`, `chunks/`, `tmp/`, ...) would be taken for that store's
//! leftovers by its collector, or could replace its files.

use crate::error::{Error, Result};
use crate::layout::{STORE_ENTRIES, STORE_MARKER};
use std::path::{Path, PathBuf};

/// `path` made absolute with its links resolved, as far as it exists: the
/// nearest existing ancestor is canonicalized and the rest appended (a
/// `..` there is the parent once the directories are made).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let mut existing = std::path::absolute(path).map_err(|e| Error::io("resolve", path, e))?;
    let mut rest = Vec::new();
    while std::fs::symlink_metadata(&existing).is_err() {
        match existing.components().next_back() {
            Some(c) => rest.push(c.as_os_str().to_os_string()),
            None => break,
        }
        if !existing.pop() {
            break;
        }
    }
    let mut resolved = if std::fs::symlink_metadata(&existing).is_ok() {
        existing
            .canonicalize()
            .map_err(|e| Error::io("resolve", &existing, e))?
    } else {
        existing
    };
    for part in rest.iter().rev() {
        match part.to_str() {
            Some("..") => {
                resolved.pop();
            }
            Some(".") => {}
            _ => resolved.push(part),
        }
    }
    Ok(resolved)
}

/// The directory a `file://` URL names; `None` for any other location.
pub fn file_url_path(location: &str) -> Option<PathBuf> {
    let parsed = url::Url::parse(location).ok()?;
    if parsed.scheme() != "file" {
        return None;
    }
    parsed.to_file_path().ok()
}

/// The cairn store among whose own entries `path` lies (its marker,
/// `runs/`, `chunks/`, `tmp/`, ... or anything under them), if any.
/// Beside those entries in a store's directory, or the directory itself,
/// is not among them.
pub fn enclosing_store(path: &Path) -> Result<Option<PathBuf>> {
    let resolved = resolve(path)?;
    for store in resolved
        .ancestors()
        .filter(|a| a.join(STORE_MARKER).is_file())
    {
        let owned = resolved
            .strip_prefix(store)
            .ok()
            .and_then(|rel| rel.components().next())
            .and_then(|c| c.as_os_str().to_str())
            .is_some_and(|first| STORE_ENTRIES.contains(&first));
        if owned {
            return Ok(Some(store.to_path_buf()));
        }
    }
    Ok(None)
}

/// Refuse a store at `path` (`what` names it in the error) among another
/// store's own entries, where that store's collector would remove it.
pub fn check_not_among_store_entries(path: &Path, what: &str) -> Result<()> {
    match enclosing_store(path)? {
        Some(store) => Err(Error::invalid(
            format!("{what} {}", path.display()),
            format!(
                "is inside the cairn store at {}, among its own files, where its gc would \
                 remove it as a leftover; choose a directory outside it",
                store.display()
            ),
        )),
        None => Ok(()),
    }
}

/// Whether `a` and `b` are one directory or one holds the other, links
/// resolved.
pub fn overlap(a: &Path, b: &Path) -> Result<bool> {
    let (a, b) = (resolve(a)?, resolve(b)?);
    Ok(a.starts_with(&b) || b.starts_with(&a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_a_store_and_beside_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        std::fs::create_dir_all(store.join("runs/r")).unwrap();
        std::fs::write(store.join(STORE_MARKER), b"{}").unwrap();
        let canon = store.canonicalize().unwrap();
        for inside in ["tmp", "runs/r/x", "chunks/new/dir", "tmp/../runs/y"] {
            assert_eq!(
                enclosing_store(&store.join(inside)).unwrap().as_deref(),
                Some(canon.as_path()),
                "{inside}"
            );
            let e = check_not_among_store_entries(&store.join(inside), "--to").unwrap_err();
            assert!(e.to_string().contains("inside the cairn store"), "{e}");
        }
        for outside in ["", "copy", "tmp/../copy", "../t"] {
            assert_eq!(
                enclosing_store(&store.join(outside)).unwrap(),
                None,
                "{outside}"
            );
        }
        // Through a link to the store.
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&store, &link).unwrap();
        assert!(enclosing_store(&link.join("tmp/x")).unwrap().is_some());
        assert!(overlap(&link, &store.join("tmp")).unwrap());
        assert!(overlap(&store, &store).unwrap());
        assert!(!overlap(&store, &dir.path().join("other")).unwrap());
    }

    #[test]
    fn file_urls_name_directories() {
        assert_eq!(
            file_url_path("file:///data/ckpt"),
            Some(PathBuf::from("/data/ckpt"))
        );
        assert_eq!(file_url_path("s3://b/p"), None);
        assert_eq!(file_url_path("/data/ckpt"), None);
    }
}
