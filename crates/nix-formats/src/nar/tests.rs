use super::*;

/// Collects visitor calls as text, for comparisons.
#[derive(Default)]
struct Log(Vec<String>);

fn show(path: &[Vec<u8>]) -> String {
    path.iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

impl NarVisitor for Log {
    fn directory(&mut self, path: &[Vec<u8>]) -> Result<(), NarError> {
        self.0.push(format!("dir {}", show(path)));
        Ok(())
    }
    fn regular(
        &mut self,
        path: &[Vec<u8>],
        executable: bool,
        size: u64,
        contents: &mut dyn std::io::Read,
    ) -> Result<(), NarError> {
        let mut buf = Vec::new();
        contents
            .read_to_end(&mut buf)
            .map_err(|e| NarError::io("test read", e))?;
        assert_eq!(buf.len() as u64, size);
        self.0.push(format!(
            "file {} {} {}",
            show(path),
            executable,
            String::from_utf8_lossy(&buf)
        ));
        Ok(())
    }
    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> Result<(), NarError> {
        self.0.push(format!(
            "link {} {}",
            show(path),
            String::from_utf8_lossy(target)
        ));
        Ok(())
    }
}

fn sample() -> (Vec<u8>, NarSummary) {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.start_directory().unwrap();
    w.entry(b"a").unwrap();
    w.regular(true, 3, &mut &b"abc"[..]).unwrap();
    w.entry(b"b").unwrap();
    w.start_directory().unwrap();
    w.entry(b"empty").unwrap();
    w.start_directory().unwrap();
    w.end_directory().unwrap();
    w.entry(b"l").unwrap();
    w.symlink(b"../a").unwrap();
    w.end_directory().unwrap();
    w.entry(b"c").unwrap();
    w.regular(false, 8, &mut &b"12345678"[..]).unwrap();
    w.end_directory().unwrap();
    let (bytes, summary) = w.finish().unwrap();
    (bytes, summary)
}

fn nar_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len() + padding(s.len() as u64), 0);
}

fn nar(tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        nar_str(&mut out, t);
    }
    out
}

fn parse_log(bytes: &[u8]) -> Result<Vec<String>, NarError> {
    let mut log = Log::default();
    parse(bytes, &mut log, ParseLimits::default())?;
    Ok(log.0)
}

#[test]
fn writes_and_reads_back() {
    let (bytes, summary) = sample();
    assert_eq!(summary.size, bytes.len() as u64);
    assert_eq!(summary.sha256, crate::hash::Hash::sha256(&bytes));
    let mut log = Log::default();
    let read = parse(&bytes[..], &mut log, ParseLimits::default()).unwrap();
    assert_eq!(read, summary);
    assert_eq!(
        log.0,
        [
            "dir ",
            "file a true abc",
            "dir b",
            "dir b/empty",
            "link b/l ../a",
            "file c false 12345678",
        ]
    );
}

#[test]
fn single_file_layout() {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    w.regular(false, 1, &mut &b"x"[..]).unwrap();
    let (bytes, _) = w.finish().unwrap();
    let expected = {
        let mut e = nar(&[MAGIC, b"(", b"type", b"regular", b"contents"]);
        e.extend_from_slice(&1u64.to_le_bytes());
        e.extend_from_slice(b"x\0\0\0\0\0\0\0");
        nar_str(&mut e, b")");
        e
    };
    assert_eq!(bytes, expected);
}

#[test]
fn writer_misuse() {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    assert!(matches!(w.entry(b"a"), Err(NarError::WriterState(_))));
    assert!(matches!(w.end_directory(), Err(NarError::WriterState(_))));
    w.start_directory().unwrap();
    assert!(matches!(w.symlink(b"x"), Err(NarError::WriterState(_))));
    w.entry(b"b").unwrap();
    assert!(matches!(w.entry(b"c"), Err(NarError::WriterState(_))));
    w.symlink(b"x").unwrap();
    assert!(matches!(
        w.entry(b"a"),
        Err(NarError::UnsortedEntries { .. })
    ));
    assert!(matches!(
        w.entry(b"b"),
        Err(NarError::UnsortedEntries { .. })
    ));
    for bad in [&b""[..], b".", b"..", b"a/b", b"a\0"] {
        assert!(matches!(w.entry(bad), Err(NarError::InvalidName { .. })));
    }
    let w2 = NarWriter::new(Vec::new()).unwrap();
    assert!(matches!(w2.finish(), Err(NarError::WriterState(_))));
    w.end_directory().unwrap();
    assert!(matches!(w.symlink(b"x"), Err(NarError::WriterState(_))));
    w.finish().unwrap();
}

#[test]
fn writer_checks_contents_length() {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    assert!(matches!(
        w.regular(false, 4, &mut &b"abc"[..]),
        Err(NarError::ContentsLength {
            declared: 4,
            actual: 3
        })
    ));
    let mut w = NarWriter::new(Vec::new()).unwrap();
    assert!(matches!(
        w.regular(false, 2, &mut &b"abc"[..]),
        Err(NarError::ContentsLength { declared: 2, .. })
    ));
}

#[test]
fn rejects_bad_magic() {
    assert!(matches!(parse_log(b""), Err(NarError::BadMagic)));
    assert!(matches!(
        parse_log(&nar(&[b"nix-archive-2"])),
        Err(NarError::BadMagic)
    ));
    assert!(matches!(
        parse_log(&nar(&[b"nix-archive-1x"])),
        Err(NarError::BadMagic)
    ));
}

#[test]
fn rejects_every_truncation() {
    let (bytes, _) = sample();
    for len in 0..bytes.len() {
        let err = parse_log(&bytes[..len]).unwrap_err();
        assert!(
            matches!(err, NarError::Truncated | NarError::BadMagic),
            "at {len}: {err}"
        );
    }
}

#[test]
fn rejects_unsorted_and_duplicate_entries() {
    let build = |names: &[&[u8]]| {
        let mut t: Vec<&[u8]> = vec![MAGIC, b"(", b"type", b"directory"];
        for n in names {
            t.extend_from_slice(&[b"entry", b"(", b"name", n, b"node"]);
            t.extend_from_slice(&[b"(", b"type", b"symlink", b"target", b"x", b")", b")"]);
        }
        t.push(b")");
        nar(&t)
    };
    assert!(parse_log(&build(&[b"a", b"b"])).is_ok());
    assert!(matches!(
        parse_log(&build(&[b"b", b"a"])),
        Err(NarError::UnsortedEntries { .. })
    ));
    assert!(matches!(
        parse_log(&build(&[b"a", b"a"])),
        Err(NarError::UnsortedEntries { .. })
    ));
    for bad in [&b""[..], b".", b"..", b"x/y", b"x\0"] {
        assert!(
            matches!(parse_log(&build(&[bad])), Err(NarError::InvalidName { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn rejects_bad_tokens_padding_and_sizes() {
    let t = nar(&[MAGIC, b"(", b"type", b"fifo", b")"]);
    assert!(matches!(parse_log(&t), Err(NarError::UnknownNodeType(_))));
    let t = nar(&[MAGIC, b"[", b"type"]);
    assert!(matches!(
        parse_log(&t),
        Err(NarError::UnexpectedToken { expected: "(", .. })
    ));
    let t = nar(&[MAGIC, b"(", b"type", b"regular", b"executable", b"x"]);
    assert!(matches!(
        parse_log(&t),
        Err(NarError::UnexpectedToken { expected: "", .. })
    ));
    let t = nar(&[MAGIC, b"(", b"type", b"regular", b"size"]);
    assert!(matches!(
        parse_log(&t),
        Err(NarError::UnexpectedToken {
            expected: "contents",
            ..
        })
    ));
    let mut t = nar(&[MAGIC, b"(", b"type", b"symlink", b"target", b"x", b")"]);
    let pad = t.len() - 8 - 8 - 1; // the byte after "x"
    t[pad - 6] = 1;
    assert!(matches!(parse_log(&t), Err(NarError::NonZeroPadding)));
    let long = vec![b'a'; 300];
    let t = nar(&[MAGIC, b"(", b"type", b"symlink", b"target", &long, b")"]);
    assert!(parse_log(&t).is_ok());
    let t = nar(&[
        MAGIC,
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        &long,
    ]);
    assert!(matches!(
        parse_log(&t),
        Err(NarError::TooLong { len: 300, .. })
    ));
    let mut t = nar(&[MAGIC, b"(", b"type", b"symlink", b"target"]);
    t.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(parse_log(&t), Err(NarError::TooLong { .. })));
    let mut t = nar(&[MAGIC, b"(", b"type"]);
    t.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        parse_log(&t),
        Err(NarError::UnexpectedToken { .. })
    ));
    let t = nar(&[MAGIC, b"(", b"type", b"directory", b"oops"]);
    assert!(matches!(
        parse_log(&t),
        Err(NarError::UnexpectedToken { .. })
    ));
}

#[test]
fn rejects_deep_nesting() {
    let mut t: Vec<&[u8]> = vec![MAGIC];
    for _ in 0..5 {
        t.extend_from_slice(&[
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
        ]);
    }
    let bytes = nar(&t);
    let limits = ParseLimits {
        max_depth: 3,
        ..ParseLimits::default()
    };
    assert!(matches!(
        parse(&bytes[..], &mut Log::default(), limits),
        Err(NarError::TooDeep(3))
    ));
}

#[test]
fn stops_after_the_nar() {
    let (mut bytes, summary) = sample();
    let len = bytes.len();
    bytes.extend_from_slice(b"more");
    let mut r = &bytes[..];
    let got = parse(&mut r, &mut Log::default(), ParseLimits::default()).unwrap();
    assert_eq!(got, summary);
    assert_eq!(r, b"more");
    assert_eq!(got.size as usize, len);
}

#[test]
fn visitor_may_skip_contents() {
    struct Skip;
    impl NarVisitor for Skip {
        fn directory(&mut self, _: &[Vec<u8>]) -> Result<(), NarError> {
            Ok(())
        }
        fn regular(
            &mut self,
            _: &[Vec<u8>],
            _: bool,
            _: u64,
            _: &mut dyn std::io::Read,
        ) -> Result<(), NarError> {
            Ok(())
        }
        fn symlink(&mut self, _: &[Vec<u8>], _: &[u8]) -> Result<(), NarError> {
            Ok(())
        }
    }
    let (bytes, summary) = sample();
    assert_eq!(
        parse(&bytes[..], &mut Skip, ParseLimits::default()).unwrap(),
        summary
    );
}

#[cfg(unix)]
#[test]
fn fs_round_trip_and_safety() {
    let tmp = tempfile::tempdir().unwrap();
    let (bytes, summary) = sample();
    let target = tmp.path().join("t");
    assert_eq!(fs::restore_path(&bytes[..], &target).unwrap(), summary);
    assert_eq!(
        std::fs::read_link(target.join("b/l")).unwrap(),
        std::path::Path::new("../a")
    );
    let mut again = Vec::new();
    assert_eq!(fs::dump_path(&target, &mut again).unwrap(), summary);
    assert_eq!(again, bytes);
    assert!(matches!(
        fs::restore_path(&bytes[..], &target),
        Err(NarError::TargetExists(_))
    ));
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(matches!(
        fs::restore_path(&trailing[..], &tmp.path().join("u")),
        Err(NarError::TrailingData)
    ));
    assert!(matches!(
        fs::restore_path(&bytes[..bytes.len() - 9], &tmp.path().join("v")),
        Err(NarError::Truncated)
    ));
}
