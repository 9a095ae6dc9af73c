import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";

export function formatTime(timestamp: Timestamp | undefined): string {
  return timestamp === undefined ? "–" : timestampDate(timestamp).toLocaleString();
}

/** "45 s", "12 min", "3 h 5 min". */
export function formatDuration(seconds: number): string {
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.ceil(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  const rest = minutes % 60;
  return rest === 0 ? `${hours} h` : `${hours} h ${rest} min`;
}
