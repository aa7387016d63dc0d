//! Line numbers from a code object's `co_linetable`, in each CPython's own format, for the
//! bytecode position the kernel side read from a frame.
//!
//! 3.10 (PEP 626) keeps pairs of (byte-offset delta, signed line delta); 3.11 and later keep
//! the location table of PEP 657 (`Objects/locations.md`): entries of varints covering a number
//! of code units each. Only lines are decoded; columns are skipped. `tests/agent/python.rs`
//! checks both decoders against `code.co_lines()` of every installed interpreter.

/// The line of the instruction at byte offset `addr` in `ranges` (from [`ranges`]), None when
/// the table gives it none or does not cover it.
pub fn line_in(ranges: &[(u32, u32, Option<i32>)], addr: u32) -> Option<i32> {
    ranges
        .iter()
        .find(|(start, end, _)| (*start..*end).contains(&addr))
        .and_then(|r| r.2)
}

/// Every `(start, end, line)` byte range of the table, as `code.co_lines()` lists them (ranges
/// without a line have None).
pub fn ranges(minor: u32, table: &[u8], first_line: i32) -> Vec<(u32, u32, Option<i32>)> {
    if minor <= 10 {
        ranges_310(table, first_line)
    } else {
        ranges_311(table, first_line)
    }
}

fn ranges_310(table: &[u8], first_line: i32) -> Vec<(u32, u32, Option<i32>)> {
    let mut out = Vec::new();
    let (mut end, mut line) = (0u32, first_line);
    for pair in table.chunks_exact(2) {
        let start = end;
        end += u32::from(pair[0]);
        let delta = pair[1] as i8;
        // -128: no line for this range.
        let this = if delta == -128 {
            None
        } else {
            line += i32::from(delta);
            Some(line)
        };
        if start != end {
            out.push((start, end, this));
        }
    }
    out
}

/// A reader of the location table's 6-bit varints.
struct Reader<'a> {
    table: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.table.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn varint(&mut self) -> Option<u32> {
        let mut b = self.byte()?;
        let mut v = u32::from(b & 63);
        let mut shift = 0;
        while b & 64 != 0 {
            b = self.byte()?;
            shift += 6;
            if shift > 30 {
                return None;
            }
            v |= u32::from(b & 63) << shift;
        }
        Some(v)
    }

    fn svarint(&mut self) -> Option<i32> {
        let v = self.varint()?;
        Some(if v & 1 != 0 {
            -((v >> 1) as i32)
        } else {
            (v >> 1) as i32
        })
    }
}

fn ranges_311(table: &[u8], first_line: i32) -> Vec<(u32, u32, Option<i32>)> {
    let mut out: Vec<(u32, u32, Option<i32>)> = Vec::new();
    let mut r = Reader { table, at: 0 };
    let (mut addr, mut line) = (0u32, first_line);
    while let Some(first) = r.byte() {
        // Every entry starts with its top bit set; anything else is a table we misread.
        if first & 0x80 == 0 {
            break;
        }
        let code = (first >> 3) & 15;
        let units = u32::from(first & 7) + 1;
        let this = match code {
            // No location.
            15 => None,
            // Long form: line delta, end line delta, column + 1, end column + 1.
            14 => {
                let Some(delta) = r.svarint() else { break };
                line += delta;
                if r.varint().and(r.varint()).and(r.varint()).is_none() {
                    break;
                }
                Some(line)
            }
            // No columns: the line delta alone.
            13 => {
                let Some(delta) = r.svarint() else { break };
                line += delta;
                Some(line)
            }
            // One-line forms: the line delta is the code's own, two column bytes follow.
            10..=12 => {
                line += i32::from(code) - 10;
                if r.byte().and(r.byte()).is_none() {
                    break;
                }
                Some(line)
            }
            // Short forms: same line, one column byte.
            _ => {
                if r.byte().is_none() {
                    break;
                }
                Some(line)
            }
        };
        let (start, end) = (addr, addr + units * 2);
        addr = end;
        // co_lines() merges neighbours of one line, as this does.
        match out.last_mut() {
            Some(last) if last.2 == this && last.1 == start => last.1 = end,
            _ => out.push((start, end, this)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_3_10_pairs() {
        // 0..6 on the first line, 6..10 two lines on, 10..12 with no line, 12..14 back at +3.
        let table = [6, 0, 4, 2, 2, 0x80, 2, 1];
        assert_eq!(
            ranges(10, &table, 5),
            vec![
                (0, 6, Some(5)),
                (6, 10, Some(7)),
                (10, 12, None),
                (12, 14, Some(8))
            ]
        );
        assert_eq!(line_in(&ranges(10, &table, 5), 8), Some(7));
        assert_eq!(line_in(&ranges(10, &table, 5), 11), None);
        assert_eq!(line_in(&ranges(10, &table, 5), 40), None);
    }

    #[test]
    fn python_3_11_location_entries() {
        let table = [
            // Code 13 (no columns), 1 unit, line +1 (svarint 2).
            0x80 | (13 << 3),
            2,
            // Short form 0, 2 units, one column byte.
            0x80 | 1,
            0,
            // One-line form 12 (+2), 1 unit, two column bytes.
            0x80 | (12 << 3),
            4,
            9,
            // Long form: 3 units, line -3 (svarint 7), end line, columns.
            0x80 | (14 << 3) | 2,
            7,
            0,
            1,
            5,
            // No location, 1 unit.
            0x80 | (15 << 3),
        ];
        assert_eq!(
            ranges(12, &table, 10),
            vec![
                (0, 6, Some(11)),
                (6, 8, Some(13)),
                (8, 14, Some(10)),
                (14, 16, None)
            ]
        );
        assert_eq!(line_in(&ranges(12, &table, 10), 7), Some(13));
        assert_eq!(line_in(&ranges(13, &table, 10), 15), None);
    }

    #[test]
    fn garbage_ends_the_table_without_panicking() {
        for table in [
            &[0x7fu8][..],
            &[0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[0xe8],
        ] {
            let _ = ranges(12, table, 1);
            let _ = ranges(10, table, 1);
        }
    }
}
