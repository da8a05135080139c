//! The demo's live view: one screen redrawn in place (ratatui on the alternate screen)
//! from the [`Frame`]s the tour publishes, until the user presses `q` or Ctrl-C or the
//! caller stops it.
//!
//! Drawing ([`draw`]) is pure: it reads one [`Frame`] and fills ratatui's buffer, so the
//! tests render into a `TestBackend` and read the text back. [`run`] owns the terminal:
//! raw mode and the alternate screen are entered by a guard whose `Drop` (and a panic
//! hook, for a panic on another thread or with `panic = "abort"`) puts the terminal back,
//! whichever way the view ends.

use std::future::Future;
use std::io::{self, IsTerminal, Stdout};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use crossterm::{cursor, execute};
use futures_util::StreamExt;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row as TableRow, Table, Wrap};
use tokio::sync::watch;

use crate::frame::{Frame, Row};

/// Whether the demo should show the live view: standard output is a terminal and
/// `TERM` is not `dumb` (a terminal that cannot move the cursor). Otherwise the caller
/// prints plain lines.
pub fn is_terminal() -> bool {
    terminal_capable(
        io::stdout().is_terminal(),
        std::env::var_os("TERM").as_deref(),
    )
}

/// [`is_terminal`]'s decision, apart from the process's state so that it is tested.
fn terminal_capable(stdout_is_tty: bool, term: Option<&std::ffi::OsStr>) -> bool {
    stdout_is_tty && term.is_none_or(|term| term != "dumb")
}

/// Shows the live view until the user presses `q` or Ctrl-C (raw mode delivers Ctrl-C
/// as a key, not SIGINT) or `stop` completes, then restores the terminal and returns
/// `Ok(())`; the caller tells the two apart by whether it completed `stop` itself, and
/// ends the demo when the user quit. Redraws on each new frame from `rx` and on every
/// resize. When the sender is dropped (the tour is over) the last frame stays on screen
/// until the user quits or `stop` completes.
///
/// `stop` is any future: e.g. `token.cancelled_owned()` of a tokio-util
/// `CancellationToken`, or `async move { let _ = stop_rx.await; }` for a oneshot.
///
/// Errors: the terminal could not be put in raw mode or the alternate screen, or
/// writing to it or reading its events failed (the terminal is restored first).
pub async fn run(mut rx: watch::Receiver<Frame>, stop: impl Future<Output = ()>) -> io::Result<()> {
    let mut screen = Screen::enter()?;
    let mut events = EventStream::new();
    let mut data = rx.borrow_and_update().clone();
    let mut tour_over = false;
    let mut input_over = false;
    tokio::pin!(stop);
    screen.draw(&data)?;
    loop {
        tokio::select! {
            // A frame first: the last one, sent just before `stop`, is drawn.
            biased;
            changed = rx.changed(), if !tour_over => {
                if changed.is_ok() {
                    data = rx.borrow_and_update().clone();
                    screen.draw(&data)?;
                } else {
                    tour_over = true;
                }
            }
            () = &mut stop => return Ok(()),
            event = events.next(), if !input_over => match event {
                Some(Ok(Event::Key(key))) if is_quit(&key) => return Ok(()),
                // Drawing resizes ratatui's buffers to the new size and clears the screen.
                Some(Ok(Event::Resize(..))) => screen.draw(&data)?,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("reading the terminal's key events: {e}"),
                    ));
                }
                // No more input (the terminal went away): only `stop` ends the view now,
                // and frames keep coming.
                None => input_over = true,
            },
        }
    }
}

/// `q` or Ctrl-C, pressed (not released: some platforms report both).
fn is_quit(key: &KeyEvent) -> bool {
    key.kind == KeyEventKind::Press
        && match key.code {
            KeyCode::Char('q' | 'Q') => true,
            KeyCode::Char('c' | 'C') => key.modifiers.contains(KeyModifiers::CONTROL),
            _ => false,
        }
}

/// Set while the terminal is in raw mode on the alternate screen, so that the guard and
/// the panic hook restore it exactly once.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The terminal in raw mode on the alternate screen; dropping it restores the terminal.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    fn enter() -> io::Result<Self> {
        install_panic_hook();
        enable_raw_mode().map_err(|e| context(e, "putting the terminal in raw mode"))?;
        ACTIVE.store(true, Ordering::SeqCst);
        // From here on a failure returns through `Restore`'s drop, which undoes raw mode.
        let restore = Restore;
        execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)
            .map_err(|e| context(e, "entering the terminal's alternate screen"))?;
        let terminal = Terminal::new(CrosstermBackend::new(io::stdout()))
            .map_err(|e| context(e, "reading the terminal's size"))?;
        std::mem::forget(restore);
        Ok(Self { terminal })
    }

    fn draw(&mut self, data: &Frame) -> io::Result<()> {
        // The panic hook restored the terminal (a panic on another thread or task):
        // drawing now would scribble over the panic message on the normal screen.
        if !ACTIVE.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "the demo's view ended: the terminal was restored after a panic",
            ));
        }
        self.terminal
            .draw(|screen| draw(screen, data))
            .map(drop)
            .map_err(|e| context(e, "drawing the demo's view"))
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Restores the terminal when dropped: covers the window in [`Screen::enter`] between
/// raw mode and a complete `Screen`.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        restore();
    }
}

/// Leaves the alternate screen, shows the cursor and ends raw mode, once. Errors are
/// ignored: this runs on the way out (drop, panic) where nothing better can be done.
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
        let _ = disable_raw_mode();
    }
}

/// Restores the terminal before the previous panic hook prints, so the message lands on
/// the normal screen and the shell is usable afterwards. Installed once per process; it
/// does nothing while the view is not shown.
fn install_panic_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

fn context(e: io::Error, doing: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{doing}: {e}"))
}

/// Draws one frame of the demo into `screen`: a header line (name, elapsed, act), the
/// per-service table, the caption, the recent events and the commands to try. On a
/// small screen the table drops its least important columns and the lower panes
/// shrink or disappear; nothing is drawn on an empty area.
pub fn draw(screen: &mut ratatui::Frame, data: &Frame) {
    let area = screen.area();
    if area.width == 0 || area.height == 0 {
        return;
    }
    let mut rest = area;

    let header = take(&mut rest, 1);
    screen.render_widget(Paragraph::new(header_line(data)), header);

    let table = take(&mut rest, table_height(data));
    draw_table(screen, data, table);

    if !data.caption.is_empty() {
        let lines = wrapped_height(&data.caption, rest.width).min(3);
        let caption = take(&mut rest, lines);
        screen.render_widget(
            Paragraph::new(data.caption.as_str())
                .style(Style::new().add_modifier(Modifier::ITALIC))
                .wrap(Wrap { trim: true }),
            caption,
        );
    }

    // Events and commands side by side when there is room for both, else stacked, the
    // commands at the bottom and given their room first (they are what the reader acts
    // on); the events get what is left, newest kept.
    if rest.width >= 120 {
        let events_wanted = u16::try_from(data.events.len().saturating_add(2)).unwrap_or(u16::MAX);
        let wanted = events_wanted.max(try_next_height(data, rest.width / 2));
        let bottom = take(&mut rest, wanted);
        let [events, try_next] =
            Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)])
                .areas(bottom);
        draw_try_next(screen, data, try_next);
        draw_events(screen, data, events);
    } else {
        let wanted = try_next_height(data, rest.width);
        let try_next = take_bottom(&mut rest, wanted);
        draw_try_next(screen, data, try_next);
        draw_events(screen, data, rest);
    }
}

/// "Sinew demo · 1m05s · 2/5 canary: 50/50 · q quits".
fn header_line(data: &Frame) -> Line<'_> {
    let dim = Style::new().fg(Color::DarkGray);
    let act = if data.act.is_empty() {
        Span::styled("starting…", dim)
    } else {
        Span::styled(data.act.as_str(), Style::new().fg(Color::Cyan))
    };
    Line::from(vec![
        Span::styled("Sinew demo", Style::new().add_modifier(Modifier::BOLD)),
        Span::styled(" · ", dim),
        Span::raw(elapsed(data.elapsed_secs)),
        Span::styled(" · ", dim),
        act,
        Span::styled(" · q quits", dim),
    ])
}

/// `65` -> "1m05s", `3725` -> "1h02m05s".
fn elapsed(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else {
        format!("{m}m{s:02}s")
    }
}

/// The table's columns, in the order they are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Service,
    Namespace,
    Rps,
    Success,
    P50,
    P99,
    Mtls,
    Split,
}

impl Column {
    const SHOWN: [Column; 8] = [
        Column::Service,
        Column::Namespace,
        Column::Rps,
        Column::Success,
        Column::P50,
        Column::P99,
        Column::Mtls,
        Column::Split,
    ];
    /// Which columns stay when the screen is narrow: the first ones.
    const KEPT_FIRST: [Column; 8] = [
        Column::Service,
        Column::Success,
        Column::Rps,
        Column::P99,
        Column::Split,
        Column::Mtls,
        Column::P50,
        Column::Namespace,
    ];

    fn title(self) -> &'static str {
        match self {
            Column::Service => "SERVICE",
            Column::Namespace => "NAMESPACE",
            Column::Rps => "RPS",
            Column::Success => "SUCCESS",
            Column::P50 => "P50",
            Column::P99 => "P99",
            Column::Mtls => "MTLS",
            Column::Split => "SPLIT",
        }
    }

    fn right_aligned(self) -> bool {
        !matches!(self, Column::Service | Column::Namespace | Column::Split)
    }

    fn cell(self, row: &Row) -> (String, Style) {
        match self {
            Column::Service => (row.service.clone(), Style::new()),
            Column::Namespace => (row.namespace.clone(), Style::new()),
            Column::Rps => (format!("{:.1}", row.rps), Style::new()),
            Column::Success => (percent_tenths(row.success), success_style(row.success)),
            Column::P50 => (millis(row.p50_ms), Style::new()),
            Column::P99 => (millis(row.p99_ms), Style::new()),
            Column::Mtls => (percent_whole(row.mtls), mtls_style(row.mtls)),
            Column::Split => (row.split.clone(), Style::new()),
        }
    }

    /// The widest of the title and the column's cells, in terminal columns.
    fn width(self, rows: &[Row]) -> u16 {
        let widest = rows
            .iter()
            .map(|row| text_width(&self.cell(row).0))
            .chain([text_width(self.title())])
            .max()
            .unwrap_or(0);
        u16::try_from(widest).unwrap_or(u16::MAX)
    }
}

/// A share as a percentage with one decimal, rounded down so that "100.0%" means no
/// request failed at all: `0.9996` -> "99.9%"; `None` (no requests) -> "-".
fn percent_tenths(share: Option<f64>) -> String {
    match share {
        // The epsilon keeps a share like 0.999 (stored as 0.998999…) at 99.9%.
        Some(share) => format!("{:.1}%", ((share * 1000.0) + 1e-6).floor() / 10.0),
        None => "-".to_owned(),
    }
}

/// A share as a whole percentage, rounded down so that "100%" means every request:
/// `0.995` -> "99%"; `None` -> "-".
fn percent_whole(share: Option<f64>) -> String {
    match share {
        Some(share) => format!("{:.0}%", ((share * 100.0) + 1e-6).floor()),
        None => "-".to_owned(),
    }
}

/// Milliseconds, to two or three significant digits: "0.8ms", "12ms", "1.25s"; `None`
/// -> "-".
fn millis(ms: Option<f64>) -> String {
    match ms {
        Some(ms) if ms < 10.0 => format!("{ms:.1}ms"),
        Some(ms) if ms < 1000.0 => format!("{ms:.0}ms"),
        Some(ms) => format!("{:.2}s", ms / 1000.0),
        None => "-".to_owned(),
    }
}

/// Green from 99 %, yellow from 95 %, red below: what a service owner would page on.
fn success_style(share: Option<f64>) -> Style {
    match share {
        Some(share) if share >= 0.99 => Style::new().fg(Color::Green),
        Some(share) if share >= 0.95 => Style::new().fg(Color::Yellow),
        Some(_) => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        None => Style::new().fg(Color::DarkGray),
    }
}

/// Green when every request was mutual TLS, yellow when some were plaintext.
fn mtls_style(share: Option<f64>) -> Style {
    match share {
        Some(share) if share >= 1.0 => Style::new().fg(Color::Green),
        Some(_) => Style::new().fg(Color::Yellow),
        None => Style::new().fg(Color::DarkGray),
    }
}

fn text_width(text: &str) -> usize {
    Line::raw(text).width()
}

/// The table's block: borders, the title row and one line per service (or one line
/// saying that none has reported yet).
fn table_height(data: &Frame) -> u16 {
    let rows = u16::try_from(data.rows.len().max(1)).unwrap_or(u16::MAX);
    rows.saturating_add(3)
}

/// Blank columns between two of the table's columns.
const SPACING: u16 = 2;

/// The columns that fit in `width` (inside the borders, [`SPACING`] between columns),
/// taken by importance (a narrow column may still fit where a wider, more important one
/// did not), returned in display order with their widths.
fn fitting_columns(rows: &[Row], width: u16) -> Vec<(Column, u16)> {
    let mut used: u16 = 0;
    let mut kept = Vec::new();
    for column in Column::KEPT_FIRST {
        let w = column.width(rows);
        let needed = if kept.is_empty() {
            w
        } else {
            w.saturating_add(SPACING)
        };
        if used.saturating_add(needed) > width {
            // The service column always stays, cut to what there is.
            if kept.is_empty() {
                kept.push(column);
                used = width;
            }
            continue;
        }
        used = used.saturating_add(needed);
        kept.push(column);
    }
    Column::SHOWN
        .into_iter()
        .filter(|column| kept.contains(column))
        .map(|column| (column, column.width(rows)))
        .collect()
}

fn draw_table(screen: &mut ratatui::Frame, data: &Frame, area: Rect) {
    if area.height == 0 {
        return;
    }
    let block = Block::new()
        .borders(Borders::ALL)
        .title(" services (last window, as the proxies report) ");
    if data.rows.is_empty() {
        screen.render_widget(
            Paragraph::new("waiting for the first telemetry…")
                .style(Style::new().fg(Color::DarkGray))
                .block(block),
            area,
        );
        return;
    }
    let inner = block.inner(area);
    let columns = fitting_columns(&data.rows, inner.width);
    let align = |column: Column, text: String, style: Style| {
        let line = Line::styled(text, style);
        Cell::from(if column.right_aligned() {
            line.right_aligned()
        } else {
            line
        })
    };
    let header = TableRow::new(columns.iter().map(|&(column, _)| {
        align(
            column,
            column.title().to_owned(),
            Style::new().add_modifier(Modifier::BOLD),
        )
    }));
    let rows = data.rows.iter().map(|row| {
        TableRow::new(columns.iter().map(|&(column, _)| {
            let (text, style) = column.cell(row);
            align(column, text, style)
        }))
    });
    let widths = columns
        .iter()
        .map(|&(column, width)| match column {
            // The last column takes what is left (a long split stays readable).
            Column::Split => Constraint::Min(width),
            _ => Constraint::Length(width),
        })
        .collect::<Vec<_>>();
    screen.render_widget(
        Table::new(rows, widths)
            .header(header)
            .column_spacing(SPACING)
            .block(block),
        area,
    );
}

/// Lines `text` takes when wrapped at `width` (an estimate by characters: captions and
/// commands are ASCII in practice).
fn wrapped_height(text: &str, width: u16) -> u16 {
    let width = usize::from(width.max(1));
    let lines = text_width(text).div_ceil(width).max(1);
    u16::try_from(lines).unwrap_or(u16::MAX)
}

fn try_next_height(data: &Frame, width: u16) -> u16 {
    if data.try_next.is_empty() {
        return 0;
    }
    let inner = width.saturating_sub(2);
    data.try_next
        .iter()
        .map(|command| wrapped_height(command, inner))
        .fold(2u16, u16::saturating_add)
}

fn draw_try_next(screen: &mut ratatui::Frame, data: &Frame, area: Rect) {
    if area.height == 0 || data.try_next.is_empty() {
        return;
    }
    let lines = data
        .try_next
        .iter()
        .map(|command| Line::styled(command.as_str(), Style::new().fg(Color::Cyan)))
        .collect::<Vec<_>>();
    // Wrapped, not cut: a command is only useful whole.
    screen.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }).block(
            Block::new()
                .borders(Borders::ALL)
                .title(" try next, from a second shell "),
        ),
        area,
    );
}

fn draw_events(screen: &mut ratatui::Frame, data: &Frame, area: Rect) {
    if area.height == 0 {
        return;
    }
    let block = Block::new().borders(Borders::ALL).title(" events ");
    let room = usize::from(block.inner(area).height);
    // The newest that fit, still oldest first.
    let shown = &data.events[data.events.len().saturating_sub(room)..];
    let lines = shown
        .iter()
        .map(|event| Line::raw(event.as_str()))
        .collect::<Vec<_>>();
    screen.render_widget(Paragraph::new(lines).block(block), area);
}

/// Takes up to `height` lines off the top of `rest`.
fn take(rest: &mut Rect, height: u16) -> Rect {
    let height = height.min(rest.height);
    let top = Rect { height, ..*rest };
    rest.y = rest.y.saturating_add(height);
    rest.height -= height;
    top
}

/// Takes up to `height` lines off the bottom of `rest`.
fn take_bottom(rest: &mut Rect, height: u16) -> Rect {
    let height = height.min(rest.height);
    rest.height -= height;
    Rect {
        y: rest.y.saturating_add(rest.height),
        height,
        ..*rest
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::ffi::OsStr;

    use ratatui::backend::TestBackend;
    use ratatui::buffer::Buffer;

    use super::*;

    fn row(service: &str, rps: f64, success: f64, split: &str) -> Row {
        Row {
            service: service.to_owned(),
            namespace: "demo".to_owned(),
            rps,
            success: Some(success),
            p50_ms: Some(1.34),
            p99_ms: Some(48.7),
            mtls: Some(1.0),
            split: split.to_owned(),
        }
    }

    fn sample() -> Frame {
        Frame {
            elapsed_secs: 65,
            act: "2/5 canary: 50/50".to_owned(),
            caption: "sinew apply moved half of catalog's traffic to v2; watch SPLIT.".to_owned(),
            rows: vec![
                row("catalog", 50.0, 1.0, "v1 50% · v2 50%"),
                row("frontend", 50.0, 0.9996, ""),
                Row {
                    service: "ratings".to_owned(),
                    namespace: "demo".to_owned(),
                    rps: 0.0,
                    success: None,
                    p50_ms: None,
                    p99_ms: None,
                    mtls: None,
                    split: String::new(),
                },
                row("reviews", 49.5, 0.90, ""),
            ],
            events: (1..=12).map(|i| format!("event number {i}")).collect(),
            try_next: vec![
                r#"eval "$(sinew demo env)""#.to_owned(),
                "sinew stat -n demo --by route".to_owned(),
            ],
        }
    }

    fn render(data: &Frame, width: u16, height: u16) -> Buffer {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|screen| draw(screen, data)).unwrap();
        terminal.backend().buffer().clone()
    }

    fn lines(buffer: &Buffer) -> Vec<String> {
        let width = usize::from(buffer.area.width);
        buffer
            .content
            .chunks(width.max(1))
            .map(|cells| cells.iter().map(|cell| cell.symbol()).collect())
            .collect()
    }

    /// The line holding `needle`, or a failure that shows the whole screen.
    fn line_with<'a>(lines: &'a [String], needle: &str) -> &'a str {
        lines
            .iter()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{}", lines.join("\n")))
    }

    /// The style of the first cell of the first occurrence of `needle`.
    fn style_of(buffer: &Buffer, needle: &str) -> Style {
        let all = lines(buffer);
        let (y, line) = all
            .iter()
            .enumerate()
            .find(|(_, line)| line.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in\n{}", all.join("\n")));
        // Cells hold one symbol each; count characters, not bytes, up to the match.
        let x = line[..line.find(needle).unwrap()].chars().count();
        buffer[(u16::try_from(x).unwrap(), u16::try_from(y).unwrap())].style()
    }

    #[test]
    fn wide_screen_shows_every_column_the_act_and_the_commands() {
        let buffer = render(&sample(), 140, 40);
        let all = lines(&buffer);
        let header = &all[0];
        assert!(header.contains("Sinew demo"), "{header}");
        assert!(header.contains("1m05s"), "{header}");
        assert!(header.contains("2/5 canary: 50/50"), "{header}");

        let titles = line_with(&all, "SERVICE");
        for title in ["NAMESPACE", "RPS", "SUCCESS", "P50", "P99", "MTLS", "SPLIT"] {
            assert!(titles.contains(title), "{title} missing from {titles}");
        }
        let catalog = line_with(&all, "catalog");
        for cell in [
            "demo",
            "50.0",
            "100.0%",
            "1.3ms",
            "49ms",
            "100%",
            "v1 50% · v2 50%",
        ] {
            assert!(catalog.contains(cell), "{cell} missing from {catalog}");
        }
        // 99.96 % is not shown as 100.0 %: rounded down.
        assert!(line_with(&all, "frontend").contains("99.9%"));
        let reviews = line_with(&all, "reviews");
        assert!(
            reviews.contains("49.5") && reviews.contains("90.0%"),
            "{reviews}"
        );
        // No requests: dashes, not zeros.
        let ratings = line_with(&all, "ratings");
        assert!(
            ratings.contains(" - ") && !ratings.contains('%'),
            "{ratings}"
        );

        line_with(&all, "watch SPLIT");
        line_with(&all, r#"eval "$(sinew demo env)""#);
        line_with(&all, "sinew stat -n demo --by route");
        // All twelve events fit on a 40-line screen.
        line_with(&all, "event number 1 ");
        line_with(&all, "event number 12");
    }

    #[test]
    fn success_is_coloured_by_threshold() {
        let mut data = sample();
        data.rows[1].success = Some(0.97);
        let buffer = render(&data, 140, 40);
        assert_eq!(style_of(&buffer, "100.0%").fg, Some(Color::Green));
        assert_eq!(style_of(&buffer, "97.0%").fg, Some(Color::Yellow));
        assert_eq!(style_of(&buffer, "90.0%").fg, Some(Color::Red));
    }

    #[test]
    fn narrow_screen_drops_the_least_important_columns_first() {
        let buffer = render(&sample(), 40, 30);
        let all = lines(&buffer);
        let titles = line_with(&all, "SERVICE");
        assert!(
            titles.contains("SUCCESS") && titles.contains("RPS"),
            "{titles}"
        );
        assert!(!titles.contains("NAMESPACE"), "{titles}");
        assert!(line_with(&all, "reviews").contains("90.0%"));
        // The commands wrap rather than being cut.
        line_with(&all, "sinew stat -n demo --by route");
        line_with(&all, "2/5 canary");
    }

    #[test]
    fn short_screen_keeps_the_newest_events() {
        let buffer = render(&sample(), 100, 24);
        let all = lines(&buffer);
        line_with(&all, "event number 12");
        assert!(
            !all.iter().any(|line| line.contains("event number 1 ")),
            "{}",
            all.join("\n")
        );
        line_with(&all, "sinew stat -n demo --by route");
    }

    #[test]
    fn before_the_tour_it_says_it_is_starting_and_waiting() {
        let buffer = render(&Frame::default(), 80, 10);
        let all = lines(&buffer);
        line_with(&all, "starting…");
        line_with(&all, "waiting for the first telemetry");
    }

    #[test]
    fn tiny_and_empty_screens_do_not_panic() {
        let mut long = sample();
        long.rows[0].service = "a-service-with-a-very-long-name".repeat(20);
        long.caption = "word ".repeat(500);
        long.try_next = vec!["x".repeat(1000)];
        for data in [sample(), Frame::default(), long] {
            for (width, height) in [
                (0, 0),
                (0, 5),
                (5, 0),
                (1, 1),
                (10, 3),
                (3, 10),
                (20, 2),
                (200, 4),
                (119, 50),
                (120, 50),
                (u16::MAX / 256, 3),
            ] {
                render(&data, width, height);
            }
        }
    }

    #[test]
    fn formats() {
        assert_eq!(percent_tenths(Some(1.0)), "100.0%");
        assert_eq!(percent_tenths(Some(0.999)), "99.9%");
        assert_eq!(percent_tenths(Some(0.99999)), "99.9%");
        assert_eq!(percent_tenths(Some(0.0)), "0.0%");
        assert_eq!(percent_tenths(None), "-");
        assert_eq!(percent_whole(Some(1.0)), "100%");
        assert_eq!(percent_whole(Some(0.995)), "99%");
        assert_eq!(percent_whole(Some(0.29)), "29%");
        assert_eq!(millis(Some(0.84)), "0.8ms");
        assert_eq!(millis(Some(12.4)), "12ms");
        assert_eq!(millis(Some(1250.0)), "1.25s");
        assert_eq!(millis(None), "-");
        assert_eq!(elapsed(0), "0m00s");
        assert_eq!(elapsed(65), "1m05s");
        assert_eq!(elapsed(3725), "1h02m05s");
    }

    #[test]
    fn quit_keys() {
        let press = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(is_quit(&press(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(is_quit(&press(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!is_quit(&press(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!is_quit(&press(KeyCode::Enter, KeyModifiers::NONE)));
        let mut release = press(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert!(!is_quit(&release));
    }

    /// Drives `run` in a real pseudo-terminal (Python's `pty`, as the test binary's
    /// stdout must be a terminal): the view starts, then ends by the way `mode` says,
    /// and afterwards the terminal is back in cooked mode with echo, on the normal
    /// screen, with the cursor shown.
    fn run_in_pty(mode: &str) -> serde_json::Value {
        const DRIVER: &str = r#"
import fcntl, json, os, pty, select, struct, sys, termios, time
exe, mode = sys.argv[1], sys.argv[2]
pid, fd = pty.fork()
if pid == 0:
    # A new pty is 0x0; give it a screen's size before the view reads it.
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    os.environ["SINEW_TUI_PTY_CHILD"] = mode
    os.environ["TERM"] = "xterm-256color"
    os.execv(exe, [exe, "tui::tests::pty_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
out, sent, deadline = b"", False, time.time() + 30
while time.time() < deadline:
    if select.select([fd], [], [], 0.1)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    # The first frame is on the alternate screen, so raw mode is on: a key is a key.
    if not sent and b"\x1b[?1049h" in out and b"Sinew demo" in out:
        if mode == "q":
            os.write(fd, b"q")
        elif mode == "ctrl-c":
            os.write(fd, b"\x03")
        sent = True
lflag = termios.tcgetattr(fd)[3]
# The pty reports end of output a moment before the process is reaped.
finished = False
while not finished and time.time() < deadline:
    finished = os.waitpid(pid, os.WNOHANG)[0] == pid
    time.sleep(0.01)
if not finished:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
leave = out.rfind(b"\x1b[?1049l")
print(json.dumps({
    "finished": finished,
    "cooked": bool(lflag & termios.ICANON) and bool(lflag & termios.ECHO),
    "drew": sent,
    "after": out[leave:].decode("utf-8", "replace") if leave >= 0 else None,
    "tail": out[-2000:].decode("utf-8", "replace"),
}))
"#;
        let exe = std::env::current_exe().unwrap();
        let output = std::process::Command::new("python3")
            .args(["-c", DRIVER])
            .arg(&exe)
            .arg(mode)
            .output()
            .expect(
                "python3 (with its pty module) is needed to drive the view in a pseudo-terminal",
            );
        assert!(
            output.status.success(),
            "the pty driver failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(
            report["finished"], true,
            "{mode}: the view did not end: {report}"
        );
        assert_eq!(
            report["drew"], true,
            "{mode}: the view never drew: {report}"
        );
        assert_eq!(
            report["cooked"], true,
            "{mode}: raw mode was left on: {report}"
        );
        let after = report["after"]
            .as_str()
            .unwrap_or_else(|| panic!("{mode}: the alternate screen was never left: {report}"));
        assert!(
            after.contains("\x1b[?25h"),
            "{mode}: cursor left hidden: {report}"
        );
        report
    }

    #[test]
    fn q_ctrl_c_and_stop_end_the_view_and_restore_the_terminal() {
        for mode in ["q", "ctrl-c", "stop"] {
            let report = run_in_pty(mode);
            let after = report["after"].as_str().unwrap();
            assert!(after.contains("run returned Ok(())"), "{mode}: {report}");
        }
    }

    #[test]
    fn a_panic_elsewhere_restores_the_terminal_and_ends_the_view() {
        let report = run_in_pty("panic");
        let after = report["after"].as_str().unwrap();
        // The panic message lands on the normal screen, and the view stops drawing.
        assert!(after.contains("boom in the tour"), "{report}");
        assert!(after.contains("restored after a panic"), "{report}");
        assert!(!after.contains("\x1b[2J"), "drew after the panic: {report}");
    }

    /// The demo side of the pty tests above: shows the view with frames arriving and
    /// ends it as `SINEW_TUI_PTY_CHILD` says. Run only by them, in a pseudo-terminal.
    #[tokio::test]
    #[ignore = "run by the pty tests above, in a pseudo-terminal"]
    async fn pty_child() {
        let mode = std::env::var("SINEW_TUI_PTY_CHILD").unwrap();
        let (tx, rx) = watch::channel(sample());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let producer_mode = mode.clone();
        // Frames keep coming, as from the tour; "stop" ends the view after a few, "panic"
        // panics on another thread once the view has drawn.
        tokio::spawn(async move {
            let mut stop_tx = Some(stop_tx);
            for i in 1u64.. {
                let mut frame = sample();
                frame.elapsed_secs = i;
                if tx.send(frame).is_err() {
                    return;
                }
                if i == 3 {
                    match producer_mode.as_str() {
                        "stop" => drop(stop_tx.take().map(|stop| stop.send(()))),
                        "panic" => drop(std::thread::spawn(|| panic!("boom in the tour"))),
                        _ => {}
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        });
        let result = run(rx, async move {
            let _ = stop_rx.await;
        })
        .await;
        println!("run returned {result:?}");
    }

    #[test]
    fn dumb_or_redirected_output_is_not_a_terminal() {
        assert!(terminal_capable(true, Some(OsStr::new("xterm-256color"))));
        assert!(terminal_capable(true, None));
        assert!(!terminal_capable(true, Some(OsStr::new("dumb"))));
        assert!(!terminal_capable(false, Some(OsStr::new("xterm"))));
    }
}
