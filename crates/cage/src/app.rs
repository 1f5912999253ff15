//! Finding the cages of a path: one cage folder (holding `cage.toml`) or an app folder whose
//! `cages/` holds one folder per cage, plus the `.shared` folder of modules every cage can use.

use std::path::{Path, PathBuf};

use crate::Error;

/// A cage found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CageDir {
    /// The folder name; the cage's name unless `cage.toml` says otherwise.
    pub folder_name: String,
    pub dir: PathBuf,
    /// `cages/.shared` next to the cage, when it exists.
    pub shared: Option<PathBuf>,
}

impl CageDir {
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("cage.toml")
    }

    /// Where `require` looks for libraries: the cage's `lua_modules`, then the app's (next to
    /// `cages/`), whether or not they exist yet.
    pub fn library_roots(&self) -> Vec<rustomnic_lua::libraries::LibraryRoot> {
        let mut roots = vec![rustomnic_lua::libraries::LibraryRoot { dir: self.dir.join("lua_modules"), display: format!("{}/lua_modules", self.folder_name) }];
        let cages = self.dir.parent();
        if let Some(app) = cages.filter(|c| c.file_name().is_some_and(|n| n == "cages")).and_then(|c| c.parent()) {
            roots.push(rustomnic_lua::libraries::LibraryRoot { dir: app.join("lua_modules"), display: "lua_modules".into() });
        }
        roots
    }
}

/// The cages at `path`, sorted by folder name.
pub fn find_cages(path: &Path) -> Result<Vec<CageDir>, Error> {
    let meta = std::fs::metadata(path).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    if !meta.is_dir() {
        return Err(Error::Io(format!("{}: not a folder (give a cage folder holding cage.toml, or an app folder holding cages/)", path.display())));
    }
    let path = path.canonicalize().map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    if path.join("cage.toml").is_file() {
        let shared = path.parent().map(|p| p.join(".shared")).filter(|p| p.is_dir());
        return Ok(vec![cage_dir(&path, shared)?]);
    }
    let cages = path.join("cages");
    if !cages.is_dir() {
        return Err(Error::Io(format!("{}: neither a cage folder (no cage.toml) nor an app folder (no cages/ folder)", path.display())));
    }
    let shared = Some(cages.join(".shared")).filter(|p| p.is_dir());
    let mut found = Vec::new();
    let entries = std::fs::read_dir(&cages).map_err(|e| Error::Io(format!("{}: {e}", cages.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::Io(format!("{}: {e}", cages.display())))?;
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !dir.is_dir() {
            continue;
        }
        if !dir.join("cage.toml").is_file() {
            tracing::warn!("{}: skipped, it holds no cage.toml", dir.display());
            continue;
        }
        found.push(cage_dir(&dir, shared.clone())?);
    }
    if found.is_empty() {
        return Err(Error::Io(format!("{}: no cage folders (each needs a cage.toml)", cages.display())));
    }
    found.sort_by(|a, b| a.folder_name.cmp(&b.folder_name));
    Ok(found)
}

fn cage_dir(dir: &Path, shared: Option<PathBuf>) -> Result<CageDir, Error> {
    let folder_name =
        dir.file_name().map(|n| n.to_string_lossy().to_string()).ok_or_else(|| Error::Io(format!("{}: a cage folder needs a name", dir.display())))?;
    Ok(CageDir { folder_name, dir: dir.to_path_buf(), shared })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_cage_or_an_app() {
        let tmp = tempfile::tempdir().unwrap();
        let app = tmp.path();
        std::fs::create_dir_all(app.join("cages/web")).unwrap();
        std::fs::create_dir_all(app.join("cages/worker")).unwrap();
        std::fs::create_dir_all(app.join("cages/.shared")).unwrap();
        std::fs::create_dir_all(app.join("cages/notes")).unwrap();
        std::fs::write(app.join("cages/web/cage.toml"), "").unwrap();
        std::fs::write(app.join("cages/worker/cage.toml"), "").unwrap();
        let cages = find_cages(app).unwrap();
        assert_eq!(cages.iter().map(|c| c.folder_name.as_str()).collect::<Vec<_>>(), ["web", "worker"]);
        assert!(cages[0].shared.as_ref().unwrap().ends_with("cages/.shared"));
        let one = find_cages(&app.join("cages/web")).unwrap();
        assert_eq!(one.len(), 1);
        assert!(one[0].shared.is_some());
        let e = find_cages(&app.join("cages")).unwrap_err().to_string();
        assert!(e.contains("neither a cage folder"), "{e}");
        assert!(find_cages(&app.join("missing")).is_err());
    }
}
